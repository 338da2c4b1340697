"""Draft models for speculative decoding where no published one fits: the
first layers of a model, with its embeddings, final norm, LM head and
tokenizer. Nothing comes from a hub, so the benchmarks and the tests build
their draft from the target itself: smaller, with the very same vocabulary.

    python -m bench.draft_models --layers 4 --out bench/out/smollm2-draft4   # from the default model
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


def write_truncated_model(source: str | Path, folder: str | Path, num_hidden_layers: int) -> Path:
    """`folder` holding `source`'s first `num_hidden_layers` layers (config,
    one safetensors file, tokenizer files); it is written once, then reused."""
    from safetensors.torch import load_file, save_file

    source, folder = Path(source), Path(folder)
    if (folder / "model.safetensors").is_file():
        return folder
    config = json.loads((source / "config.json").read_text())
    if not 1 <= num_hidden_layers < config["num_hidden_layers"]:
        raise ValueError(f"a draft keeps 1..{config['num_hidden_layers'] - 1} layers, not {num_hidden_layers}")
    folder.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors") and path.name != "config.json":
            shutil.copy(path, folder / path.name)
    # Per-layer lists (Qwen2's layer_types) keep their first entries too.
    per_layer = {key: value[:num_hidden_layers] for key, value in config.items()
                 if isinstance(value, list) and len(value) == config["num_hidden_layers"]}
    config.update(per_layer, num_hidden_layers=num_hidden_layers)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {}
    for path in sorted(source.glob("*.safetensors")):
        for name, tensor in load_file(path).items():
            layer = _LAYER.search(name)
            if layer is None or int(layer.group(1)) < num_hidden_layers:
                tensors[name] = tensor
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="the target's folder (default: the prepared default model)")
    parser.add_argument("--layers", type=int, default=4, help="layers the draft keeps")
    parser.add_argument("--out", required=True, help="the draft's folder")
    args = parser.parse_args()
    print(write_truncated_model(args.model or default_model(), args.out, args.layers))


if __name__ == "__main__":
    main()
