"""The demo: a tied GPT-2 checkpoint, converted and loaded back tied.

Builds a small GPT-2 from a transformers config (nothing is downloaded), saves
its state dict with ``torch.save`` as ``pytorch_model.bin`` (``lm_head.weight``
*is* ``transformer.wte.weight`` there), runs ``tiesafe convert`` as a user would,
then loads the result and shows the tie came back.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import converter


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="tiesafe-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=8000, n_positions=128, n_embd=256, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config).eval()
    source = folder / "pytorch_model.bin"
    torch.save(model.state_dict(), source)
    config.save_pretrained(folder)
    print(f"built {source} ({source.stat().st_size / 2**20:.1f} MiB): lm_head.weight shares transformer.wte.weight\n")

    print("$ tiesafe convert", source)
    subprocess.run([sys.executable, "-m", "converter", "convert", str(source), "--overwrite"], check=True)

    output = folder / "model.safetensors"
    state = converter.load_file(output)
    tied = state["lm_head.weight"] is state["transformer.wte.weight"]
    print(f"\nconverter.load_file: lm_head.weight is transformer.wte.weight -> {tied}")
    reference = torch.load(source, weights_only=True)
    same = all(torch.equal(state[k], reference[k]) for k in reference) and set(state) == set(reference)
    print(f"every one of {len(reference)} names equals the source -> {same}")
    print(f"sizes: pytorch_model.bin {source.stat().st_size:,} B, model.safetensors {output.stat().st_size:,} B")

    fresh = GPT2LMHeadModel(config).eval()  # other random weights
    report = converter.load_model(fresh, output)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        logits_match = torch.equal(fresh(ids).logits, model(ids).logits)
    module_tied = fresh.lm_head.weight is fresh.transformer.wte.weight
    print(f"converter.load_model: {len(report.tied)} tie(s) rebuilt, logits identical -> {logits_match}")
    if not (tied and same and logits_match and module_tied):
        sys.exit(1)


if __name__ == "__main__":
    main()
