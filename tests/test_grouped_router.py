"""nn.GroupedRouter (DeepSeek V3's sigmoid routing over groups of experts) against transformers' router of GLM-4.5,
which implements it: the same experts chosen and the same fp32 weights, with and without groups."""

from __future__ import annotations

import pytest
import torch

from autolm.nn import GroupedRouter


@pytest.mark.parametrize("n_group,topk_group,norm", [(1, 1, True), (4, 2, True), (4, 1, False)])
def test_matches_transformers(n_group, topk_group, norm):
    from transformers import Glm4MoeConfig
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

    config = Glm4MoeConfig(hidden_size=32, n_routed_experts=16, num_experts_per_tok=3, n_group=n_group,
                           topk_group=topk_group, norm_topk_prob=norm, routed_scaling_factor=2.5)  # fmt: skip
    theirs = Glm4MoeTopkRouter(config)
    torch.manual_seed(0)
    torch.nn.init.normal_(theirs.weight, std=0.3)
    theirs.e_score_correction_bias.normal_(std=0.5)
    ours = GroupedRouter(32, 16, 3, n_group=n_group, topk_group=topk_group, normalize=norm, scaling=2.5)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(40, 32, dtype=torch.bfloat16)
    _, weights, ids = theirs(x)
    our_ids, our_weights = ours(x)
    order, our_order = ids.sort(dim=-1), our_ids.sort(dim=-1)
    torch.testing.assert_close(our_order.values, order.values)
    torch.testing.assert_close(our_weights.gather(1, our_order.indices), weights.gather(1, order.indices))
    assert our_weights.dtype == torch.float32


def test_groups_must_divide_the_experts():
    from autolm.errors import ConfigError

    with pytest.raises(ConfigError, match="groups"):
        GroupedRouter(8, 10, 2, n_group=4, topk_group=2)
