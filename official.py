"""
Import of the official TerDiT checkpoints (Hugging Face lucky-lance/TerDiT, arXiv 2405.14854) into model.py's TerDiT.

    python pack.py --ckpt checkpoints/3B_1180000 --out 3B.tdit       # pack one for deployment
    python sample.py --ckpt checkpoints/3B_1180000 --vae /models/sd-vae-ft-ema --classes 89 475 --device cuda
    python -c "import official; print(official.read_reference('checkpoints/3B_1180000')[0])"

A checkpoint folder holds model_args.pth (the reference's training arguments, a pickled argparse.Namespace) and
consolidated_ema_ternary.00-of-01.pth (the EMA weights). Its network is Large-DiT's DiT_Llama, which model.py
implements with the same parameter names, so the import is three translations:
- each ternary layer's weight is stored as trits in hqq's 2-bit layout (unpack_hqq_2bit);
- the registry name picks one of model.SIZES (REFERENCE_MODELS), the arguments the rest of the config: latents of
  an 8x-downsampling VAE (4 channels), learned sigma, and the reference's classifier-free guidance of 3 channels;
- the reference's labels are not ImageNet's class indices (REFERENCE_LABELS): the label table is permuted.
"""

import argparse
import os
from dataclasses import asdict

import torch

from model import SIZES, TerDiT, TerDiTConfig
from quant import TernaryLinear

REFERENCE_MODELS = {"DiT_Llama_600M_patch2": "600M", "DiT_Llama_3B_patch2": "4.2B"}  # its registry -> model.SIZES
REFERENCE_WEIGHTS = "consolidated_ema_ternary.00-of-01.pth"


# The reference trained on an ImageFolder of class folders "0" ... "999", whose labels are the folders' ranks sorted
# as strings ("0", "1", "10", "100", ...): ImageNet class c is its label REFERENCE_LABELS[c].
REFERENCE_LABELS = torch.argsort(torch.tensor(sorted(range(1000), key=str))).tolist()  # inverse of the string order


def unpack_hqq_2bit(w):
    """hqq's 2-bit layout, uint8 (out/4, in) -> int8 trits (out, in): codes = trit + 1, and byte row i holds rows
    i, i + out/4, i + 2·out/4, i + 3·out/4 in bits 7-6, 5-4, 3-2, 1-0."""
    return torch.cat([(w >> s) & 3 for s in (6, 4, 2, 0)]).to(torch.int8) - 1


def read_reference(folder):
    """(config dict, TerDiT in eval mode) from an official checkpoint folder. Each ternary layer's latent weight
    becomes its trits: ternarize(W̃) = W̃ (γ = mean|W̃| <= 1), so the QAT forward computes the reference's α·W̃.
    The label table's rows are permuted so that our label c is ImageNet class c (REFERENCE_LABELS). ValueError
    (one line) for a folder that is not such a checkpoint, or of a model this code does not implement."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # the one class its pickle may build
            train_args = vars(torch.load(os.path.join(folder, "model_args.pth"), weights_only=True))
        state = torch.load(os.path.join(folder, REFERENCE_WEIGHTS), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"'{folder}' is not an official TerDiT checkpoint folder (model_args.pth and "
                         f"{REFERENCE_WEIGHTS}): {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}") from None
    name = train_args.get("model")
    if name not in REFERENCE_MODELS or train_args.get("num_classes") != 1000 or train_args.get("image_size", 0) % 16:
        raise ValueError(f"'{folder}' holds {name} at {train_args.get('image_size')} px with "
                         f"{train_args.get('num_classes')} classes: only {', '.join(REFERENCE_MODELS)}, ImageNet (1000 classes) "
                         f"and a size divisible by 16 are supported")
    config = TerDiTConfig(**SIZES[REFERENCE_MODELS[name]], input_size=train_args["image_size"] // 8,
                          in_channels=4, num_classes=1000, qk_norm=bool(train_args.get("qk_norm", False)),
                          learn_sigma=True, reference_cfg=True)
    model = TerDiT(config, device="meta")
    missing = [k for k in model.state_dict() if k not in state]
    if missing:  # an incomplete download, or another network's weights
        raise ValueError(f"'{folder}': its weights lack {len(missing)} of {name}'s tensors ({', '.join(missing[:4])}"
                         f"{', ...' if len(missing) > 4 else ''}): download {REFERENCE_WEIGHTS} again")
    ternary = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, TernaryLinear) and m.ternary}
    state = {k: unpack_hqq_2bit(v).float() if k in ternary else v.float() for k, v in state.items()}
    table = state["y_embedder.embedding_table.weight"]
    state["y_embedder.embedding_table.weight"] = table[REFERENCE_LABELS + [1000]]
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"'{folder}': its weights do not match {name}: {str(err).splitlines()[0]}") from None
    return asdict(config), model.requires_grad_(False).eval()
