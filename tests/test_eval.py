"""lm-evaluation-harness: the autolm backend scores what lm-eval's own `hf` backend scores, item by item,
on a local multiple-choice task, a perplexity task and a generation task (the hub is not reachable)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")

ROWS = [
    {
        "question": "The capital of France is",
        "choices": [" Paris", " London", " Berlin"],
        "answer": 0,
        "target": " Paris",
        "text": "Paris is the capital and largest city of France.",
    },
    {
        "question": "Two plus two equals",
        "choices": [" four", " five", " seven"],
        "answer": 0,
        "target": " four",
        "text": "Water boils at one hundred degrees Celsius at sea level.",
    },
    {
        "question": "The sky on a clear day is",
        "choices": [" green", " blue", " red"],
        "answer": 1,
        "target": " blue",
        "text": "The quick brown fox jumps over the lazy dog, again and again.",
    },
]
COMMON = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
TASKS = {
    "autolm_mc": 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
    'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n',
    "autolm_ppl": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
    "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n",
    "autolm_gen": 'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{target}}"\n'
    'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 8\n  do_sample: false\n'
    "metric_list:\n  - metric: exact_match\n",
}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    data = d / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    for name, body in TASKS.items():
        (d / f"{name}.yaml").write_text(f"task: {name}\n" + COMMON.format(data=data) + body)
    return str(d)


@pytest.fixture(scope="module")
def both(smol_dir, tasks):
    """lm-eval's results with its hf backend and with autolm's, samples logged."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from autolm.eval import lm_class

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    tm = TaskManager(include_path=tasks)
    kw = dict(
        tasks=list(TASKS),
        task_manager=tm,
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    ref = simple_evaluate(model="hf", model_args=f"pretrained={smol_dir},dtype=float32,device=cpu", **kw)
    got = simple_evaluate(model=lm_class()(pretrained=smol_dir, dtype="float32", batch_size=2), **kw)
    return ref, got


@pytest.mark.parametrize("task", list(TASKS))
def test_items_and_scores_equal_the_hf_backend(both, task):
    ref, got = both
    for a, b in zip(got["samples"][task], ref["samples"][task], strict=True):
        assert a["doc_id"] == b["doc_id"]
        for ra, rb in zip(a["resps"], b["resps"], strict=True):
            if task == "autolm_gen":
                assert ra == rb and rb[0].strip()  # the same non-empty greedy text
            else:  # (loglikelihood, is_greedy) per choice, or a rolling loglikelihood
                (ll_a, *greedy_a), (ll_b, *greedy_b) = (
                    r[0] if isinstance(r[0], tuple) else (r[0],) for r in (ra, rb)
                )
                assert abs(ll_a - ll_b) < 1e-4 and greedy_a == greedy_b
    for metric, value in ref["results"][task].items():
        if isinstance(value, float):
            assert got["results"][task][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), metric


def test_autolm_eval_command(smol_dir, tasks, both, tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "autolm.cli",
            "eval",
            smol_dir,
            "--tasks",
            "autolm_mc",
            "--include-path",
            tasks,
            "--dtype",
            "float32",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_DATASETS_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "autolm_mc" in proc.stdout and "acc" in proc.stdout
    saved = json.loads(out.read_text())
    assert saved["autolm_mc"]["acc,none"] == pytest.approx(both[0]["results"]["autolm_mc"]["acc,none"])
