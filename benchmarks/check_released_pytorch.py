#!/usr/bin/env python
"""Load owl_jax exports with the released PyTorch mPLUG-Owl code and compare its logits with a reference.

Needs an environment with the released code's own dependencies (transformers 4.28.x, torch) and a
checkout of it (the folder that contains the `mplug_owl` package):

    python benchmarks/check_released_pytorch.py --released-code PATH/TO/mPLUG-Owl \
        --reference tests/fixtures/mplug_owl_tiny/reference.npz EXPORT_DIR [EXPORT_DIR ...]

Each folder is loaded into `MplugOwlForConditionalGeneration` with `load_state_dict(strict=True)` and run
in float32 on the reference inputs; folders whose name contains "merged" are compared with the LoRA logits.
"""

import argparse
import glob
import os
import sys

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--released-code", required=True, help="folder holding the released `mplug_owl` package")
    parser.add_argument("--reference", required=True, help="reference.npz of the fixture")
    parser.add_argument("folders", nargs="+")
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.released_code))
    import torch
    from mplug_owl.configuration_mplug_owl import MplugOwlConfig
    from mplug_owl.modeling_mplug_owl import MplugOwlForConditionalGeneration

    ref = np.load(args.reference)
    for folder in args.folders:
        model = MplugOwlForConditionalGeneration(MplugOwlConfig.from_pretrained(folder)).float().eval()
        state = {}
        for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
            from safetensors.torch import load_file

            state.update(load_file(path))
        for path in sorted(glob.glob(os.path.join(folder, "*.bin"))):
            state.update(torch.load(path, map_location="cpu", weights_only=True))
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        ids = torch.from_numpy(ref["input_ids"])
        t = lambda name: torch.from_numpy(ref[name])
        with torch.no_grad():
            out = model(
                pixel_values=t("pixel_values"),
                input_ids=ids.clone(),
                num_images=t("num_images"),
                non_padding_mask=t("non_padding_mask"),
                non_media_mask=t("non_media_mask"),
                prompt_mask=t("prompt_mask"),
                attention_mask=t("attention_mask"),
                labels=ids.clone(),
            )
        key = "lora_logits" if "merged" in os.path.basename(folder) else "logits"
        err = float(np.abs(out.logits.numpy() - ref[key]).max())
        print(f"{folder}: strict load of {len(state)} tensors ok; max |logits - {key}| = {err:.2e}")


if __name__ == "__main__":
    main()
