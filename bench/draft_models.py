"""Draft models for speculative decoding where no published one fits: some
of a model's decoder layers, with its embeddings, final norm, LM head and
tokenizer (a layer-skipping draft, as in self-speculative decoding). Nothing
comes from a hub, so the benchmarks and the tests build their draft from the
target itself: smaller, with the very same vocabulary.

    python -m bench.draft_models --layers 0-3 --out bench/out/smollm2-draft4   # from the default model
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench.` imports resolve
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import default_model

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def write_draft_model(source: str | Path, folder: str | Path, layers: list[int]) -> Path:
    """`folder` holding `source` with only the decoder layers `layers` (ids in the
    source, kept in order and renumbered from 0), its config, one safetensors
    file and the tokenizer files; it is written once, then reused."""
    from safetensors.torch import load_file, save_file

    source, folder = Path(source), Path(folder)
    if (folder / "model.safetensors").is_file():
        return folder
    config = json.loads((source / "config.json").read_text())
    num_layers = config["num_hidden_layers"]
    if not layers or len(set(layers)) != len(layers) or len(layers) >= num_layers or \
            not all(0 <= layer < num_layers for layer in layers):
        raise ValueError(f"a draft keeps some of the layers 0..{num_layers - 1}, each once, not {layers}")
    renumber = {old: new for new, old in enumerate(sorted(layers))}
    folder.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors") and path.name != "config.json":
            shutil.copy(path, folder / path.name)
    # Per-layer lists (Qwen2's layer_types) keep the kept layers' entries.
    per_layer = {key: [value[old] for old in sorted(layers)] for key, value in config.items()
                 if isinstance(value, list) and len(value) == num_layers}
    config.update(per_layer, num_hidden_layers=len(layers))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {}
    for path in sorted(source.glob("*.safetensors")):
        for name, tensor in load_file(path).items():
            layer = _LAYER.search(name)
            if layer is None:
                tensors[name] = tensor
            elif int(layer.group(1)) in renumber:
                tensors[name[: layer.start()] + f".layers.{renumber[int(layer.group(1))]}." + name[layer.end():]] = tensor
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def parse_layers(text: str) -> list[int]:
    """"0-13,28,29" -> [0, ..., 13, 28, 29]."""
    layers = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        layers += range(int(first), int(last or first) + 1)
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="the target's folder (default: the prepared default model)")
    parser.add_argument("--layers", default="0-3", help="the layers the draft keeps, as 0-13,28,29")
    parser.add_argument("--out", required=True, help="the draft's folder")
    args = parser.parse_args()
    print(write_draft_model(args.model or default_model(), args.out, parse_layers(args.layers)))


if __name__ == "__main__":
    main()
