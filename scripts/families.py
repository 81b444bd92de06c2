"""Which model families of the installed transformers convert: the list README shows.

    .venv/bin/python scripts/families.py                 # print the list (a minute on 2 cores)
    .venv/bin/python scripts/families.py --readme README.md   # and write it between README's markers

The families are enumerated by code (linearize.models.families: every causal-LM family whose
modeling code calls transformers' AttentionInterface), each built from a tiny random config and
converted with attention=lolcats, as tests/test_families.py does (it checks each further:
teacher equality, stage-1 steps, decoding, export).
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from linearize.config import register_configs, validate  # noqa: E402
from linearize.models.families import convert_check, interface_families  # noqa: E402

START, END = "<!-- families:start -->", "<!-- families:end -->"


def classify() -> dict[str, list[tuple[str, str]]]:
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        attention = validate(compose("config", overrides=["attention=lolcats", "attention.convert=all"])).attention
    out: dict[str, list[tuple[str, str]]] = {"converts": [], "refused": [], "fails": [], "unbuilt": []}
    for family in interface_families():
        kind, why = convert_check(family, attention)
        out[kind].append((family, why))
    return out


def markdown(groups: dict[str, list[tuple[str, str]]]) -> str:
    import transformers

    names = lambda rows: ", ".join(f"`{f}`" for f, _ in rows)  # noqa: E731
    lines = [
        f"With transformers {transformers.__version__}, lolcats swaps into {len(groups['converts'])} families "
        f"(of {sum(map(len, groups.values()))} whose attention goes through the AttentionInterface; a tiny model of "
        "each converted and run by `scripts/families.py`, which wrote this list). `tests/test_families.py` checks "
        "llama, mistral, qwen2, qwen3, qwen3_moe, gemma2, gemma3_text, olmo2, phi3, granite, cohere and "
        "starcoder2 in full (teacher equality, stage-1 steps, decoding, export, lolcats/liger/supra); the others "
        "are not yet checked that far, and some refuse decoding or the pre-rotary kinds (liger, supra) with an "
        "error saying why:",
        "",
        names(groups["converts"]) + ".",
        "",
        "Refused, each with an error saying why (bidirectional encoders, keys beside the sequence's, no "
        f"layer index): {names(groups['refused'])}.",
    ]
    if groups["fails"]:
        lines += ["", f"Swapped in, but the converted model does not run yet: {names(groups['fails'])}."]
    if groups["unbuilt"]:
        lines += ["", f"Not checked (the tests' tiny-config builder cannot make them small): {names(groups['unbuilt'])}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", type=Path, help=f"replace the text between {START} and {END} in this file")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    text = markdown(classify())
    print(text)
    if args.readme:
        readme = args.readme.read_text()
        if START not in readme or END not in readme:
            sys.exit(f"{args.readme} has no {START} ... {END} markers to write between")
        pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.DOTALL)
        args.readme.write_text(pattern.sub(lambda _: f"{START}\n{text}{END}", readme))


if __name__ == "__main__":
    main()
