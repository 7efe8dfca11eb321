"""llama.cpp's BPE pre-tokenizers as data: for each `tokenizer.ggml.pre` name llama.cpp knows (llama-vocab.cpp,
llama_vocab::impl::load), the regexes its llm_tokenizer_bpe splits text with, one after the other: each regex
splits every piece the previous ones left into its matches and the runs between them. A `tokenizers`
Sequence of Split(regex, "isolated") does the same, ByteLevel(use_regex=False) then spelling the bytes.

Where llama.cpp rewrote a tokenizer.json regex for its std::regex engine ((?i:...) spelled out letter by letter,
possessive quantifiers made greedy, \\p{Lu} / \\p{Ll} told apart by lookaheads) the tokenizer.json form is kept;
where it runs a hand-written splitter instead of a regex (\\p{AFMoE_digits}, Kimi K2's \\p{Han}+), the regex that
splitter implements. The flags are those llama.cpp sets with the name. Data only."""

from __future__ import annotations

_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# GPT-4o's (o200k) split: a word is capitals then small letters, or capitals alone, with a contraction after it
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_CASED_WORDS = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
)
GPT4O = _CASED_WORDS + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# DeepSeek V3's last split (also Hunyuan dense's, AFMoE's, Spark's with another newline rule)
_DEEPSEEK3_WORDS = (
    '[!"#$%&'
    + r"'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+"
)
_KANA_HAN = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
_CJK_HANGUL = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_PUNCTUATION_WORDS = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"
_LATIN_GREEK_CYRILLIC = (
    "\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376"
    "\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f"
    "\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d"
    "\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb"
    "\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
    "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4"
    "\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
    "\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943]+"
)
# llama.cpp's AFMoE range of CJK compatibility ideographs starts at U+8C48 (the NFC form of U+F900), as it is
_AFMOE_ASIAN = (
    "[\u4e00-\u9fff\u3400-\u4dbf\u8c48-\ufaff\u3040-\u309f\u30a0-\u30ff\uff65-\uff9f\u2f00-\u2fdf"
    "\u0e40-\u0e7f\u0e80-\u0eff\u1780-\u17ff\u1000-\u109f\uaa60-\uaa7f\ua9e0-\ua9ff\uac00-\ud7af\u1100-\u11ff]+"
)
_KIMI_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_KIMI_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
KIMI_K2 = (
    rf"[\p{{Han}}]+|[^\r\n\p{{L}}\p{{N}}]?{_KIMI_UPPER}*{_KIMI_LOWER}+{_CONTRACTIONS}?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_KIMI_UPPER}+{_KIMI_LOWER}*{_CONTRACTIONS}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_NEWLINE_RUNS = r"[^\n]+|[\n]+"
_TAIL = r"|\s+(?!\S)|\s+"  # trailing blanks but the last (which goes with the next word), then any blanks
_JAIS2_BLANKS = (
    "".join(rf"|\s{{{n}}}(?!\S)" for n in (512, 256, 128, 64, 32, 16, 8, 4)) + r"|\s{1,2}(?!\S)|\s{1}"
)

DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]")
JAIS2 = (LLAMA3.removesuffix(_TAIL) + _JAIS2_BLANKS,)
DEEPSEEK_LLM = (
    "[\r\n]",
    _LATIN_GREEK_CYRILLIC,
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    r"\s+$",
    _CJK_HANGUL,
    r"\p{N}+",
)
DEEPSEEK3 = (r"\p{N}{1,3}", _KANA_HAN, _DEEPSEEK3_WORDS + r"[\r\n]*|\s*[\r\n]+" + _TAIL)
SPARK2_5 = (r"\p{N}{1,3}", _KANA_HAN, _DEEPSEEK3_WORDS + r"|[\r\n]" + _TAIL, r"\p{N}")
YOUTU = (
    "[\uac00-\ud7a3\u3131-\u318e]+|[\uff01\u2026\u201c\u201d\u2018\u2019\u2014\uff1a\uff1b\uff0c\u3001-\u303f"
    "\ufe30-\ufe4f]+|[\u3105-\u312f]+|" + _KANA_HAN,
    _CASED_WORDS + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+" + _TAIL,
)
DEEPSEEK_CODER = ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_HANGUL, r"\p{N}")
FALCON = (r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]")
QWEN35 = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
    + _TAIL,
)
TEKKEN = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+" + _TAIL,
)
CHAMELEON = (
    "<sentinel:[0-9]+>",
    "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
    "([\\t\\n]|    |  )",
    r"\p{N}",
    r"[\p{P}!-/:-@\[-`{-~]",
    GPT2,
)
BAILINGMOE = (
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]" + _TAIL,
)
SEED_CODER = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+" + _TAIL,
)
# llama.cpp's \p{AFMoE_digits}: a run of digits in threes from its end
AFMOE = (
    r"\p{N}{1,3}(?=(?:\p{N}{3})*(?!\p{N}))",
    _AFMOE_ASIAN,
    _DEEPSEEK3_WORDS + r"[\r\n]*|\s*[\r\n]+" + _TAIL,
)
EXAONE_MOE = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?"
    r"|\s*[\r\n]" + _TAIL,
)
MINICPM5 = (r"\p{N}{1,3}", LLAMA3.replace(r"|\p{N}{1,3}|", r"|\p{N}+|"))

# space-separated names -> the regexes llama.cpp splits their text with
_BY_NAMES: dict[str, tuple[str, ...]] = {
    "default": DEFAULT,
    "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano dbrx smaug-bpe chatglm-bpe "
    "glm4 glm5": (LLAMA3,),
    "jais-2": JAIS2,
    "deepseek-llm": DEEPSEEK_LLM,
    "deepseek-v3 hunyuan-dense joyai-llm hy_v4": DEEPSEEK3,
    "spark2_5": SPARK2_5,
    "youtu": YOUTU,
    "deepseek-coder": DEEPSEEK_CODER,
    "falcon": FALCON,
    "starcoder refact command-r smollm codeshell exaone minerva-7b mellum2": (r"\p{N}", GPT2),
    "gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert jina-v1-en jina-v2-code "
    "roberta-bpe exaone4 mpt olmo jais trillion granite-docling": (GPT2,),
    "qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open grok-2": (QWEN2,),
    "qwen35": QWEN35,
    "poro-chat bloom gpt3-finnish": (_PUNCTUATION_WORDS,),
    "viking": (_PUNCTUATION_WORDS, r"\p{N}"),
    "tekken": TEKKEN,
    "chameleon": CHAMELEON,
    "gpt-4o llama4 kanana2 talkie minimax-m2 granite-embed-multi-97m": (GPT4O,),
    "tiny_aya cohere2moe": (r"\d{1,3}(?=(?:\d{3})*\b)", GPT4O),
    "kimi-k2": (KIMI_K2,),
    "superbpe": (r"\p{N}+", r"(?=(\d{3})+(?!\d))"),
    "bailingmoe bailingmoe2 llada-moe": BAILINGMOE,
    "seed-coder": SEED_CODER,
    "ufakzeka": (QWEN2.removeprefix(_CONTRACTIONS + "|"),),
    "afmoe": AFMOE,
    "laguna": (_NEWLINE_RUNS, QWEN2),
    "exaone-moe": EXAONE_MOE,
    "minicpm5": MINICPM5,
    "gemma4 granite-embed-multi-311m sarvam-moe": (_NEWLINE_RUNS,),
}
SPLITS: dict[str, tuple[str, ...]] = {name: rx for names, rx in _BY_NAMES.items() for name in names.split()}

# names whose pieces llama.cpp takes whole where the vocabulary holds them, before any merge
_IGNORE_MERGES = "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano minicpm5 youtu glm4 glm5 tekken granite-embed-multi-97m"
IGNORE_MERGES = frozenset(_IGNORE_MERGES.split())
# names llama.cpp adds <bos> for where the file does not say (tokenizer.ggml.add_bos_token), and those it always
# adds it for (Gemma 4's)
_ADD_BOS = "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano tekken chameleon"
ADD_BOS = frozenset(_ADD_BOS.split())
FORCE_BOS = frozenset({"gemma4", "granite-embed-multi-311m"})
# names whose vocabulary llama.cpp reads as raw UTF-8 with spaces written "\u2581" (SentencePiece-style pieces,
# <0xXX> byte pieces), not in GPT-2's byte spelling. (Its "whitespace" pre-tokenizer, also raw UTF-8, goes with
# tokenizer model "whitespace", which autolm does not read.)
ESCAPED_SPACES = frozenset({"gemma4", "granite-embed-multi-311m", "sarvam-moe"})
