"""
Training images: the embedded Fashion-MNIST subset, an ImageFolder of your own, and the optional VAE that turns
images into DiT latents (as DiT and TerDiT do for ImageNet).

    python -c "import data; d = data.load_dataset(None, 32); print(len(d), d.channels, d.class_names)"

Embedded default: data/fashion_mnist.npz, 40,000 training (4,000 per class) and 2,000 test images of
Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, MIT licence, Copyright © 2017 Zalando SE), 28×28 greyscale, taken
from Debian's dataset-fashion-mnist package. Resized to 32×32, a patch-2 DiT sees 256 tokens: the paper's
256-px latent setting.

ImageFolder: root/<class>/<image>, the ImageNet layout. Images are converted to RGB (16-bit greyscale scaled to
8 bits, transparency composited on white, palette, CMYK, 1-bit), centre-cropped and resized as in DiT (ADM's
center_crop_arr). An unreadable image is an error that names the file: a silently shrinking dataset is worse than
a stopped run. A class folder without images is left out with a warning (torchvision refuses it): as a class it
would be a label no image teaches.
"""

import os

import numpy as np
import torch
import torch.nn.functional as F

import cli

EMBEDDED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "fashion_mnist.npz")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VAE_SCALE = 0.18215  # DiT/LDM: latents of sd-vae-ft-ema are multiplied by this to have about unit variance


class UnreadableImage(ValueError):
    pass


def load_embedded(split="train"):
    """The embedded Fashion-MNIST arrays: uint8 images (N, H, W, C), int64 labels (N,), and the class names."""
    with np.load(EMBEDDED) as f:
        prefix = "" if split == "train" else "test_"
        return (torch.from_numpy(f[prefix + "images"]), torch.from_numpy(f[prefix + "labels"].astype(np.int64)),
                [str(s) for s in f["class_names"]])


class ArrayDataset(torch.utils.data.Dataset):
    """In-memory uint8 images, resized once to image_size and scaled to [-1, 1]."""

    def __init__(self, images, labels, class_names, image_size):
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, C, H, W) in [-1, 1]
        if x.shape[-1] != image_size:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        self.x, self.y, self.class_names = x.clamp(-1, 1), labels, class_names
        self.channels = x.shape[1]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def center_crop_arr(pil_image, image_size):
    """ADM's centre crop (as in DiT's train.py): halve with BOX while large, resize with BICUBIC, crop."""
    from PIL import Image
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size]


def to_rgb(im):
    """An 8-bit RGB PIL image from any mode. PIL's own convert("RGB") clips 16-bit greyscale (I;16, I) to
    white and drops transparency (showing whatever colour hides under it), so those two are done here."""
    from PIL import Image
    if im.mode.startswith("I"):  # 16-bit greyscale PNG: 0..65535 -> 0..255
        im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, "white"), im).convert("RGB")
    return im.convert("RGB")


class ImageFolder(torch.utils.data.Dataset):
    """root/<class_name>/<image>; labels are the sorted class folder names' indices."""

    def __init__(self, root, image_size):
        if os.path.exists(root) and not os.path.isdir(root):
            raise ValueError(f"--data '{root}' is a file, not a folder of class sub-folders of images: pass --data "
                             f"their parent folder (the ImageNet layout), or leave --data out for the embedded dataset")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data directory '{root}' does not exist: pass --data a folder of class "
                                    f"sub-folders of images, or leave --data out to use the embedded dataset")
        images = {d: [f for f in sorted(os.listdir(os.path.join(root, d))) if f.lower().endswith(IMAGE_EXTENSIONS)]
                  for d in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, d))}
        empty = [d for d, files in images.items() if not files]
        if empty and images.keys() - empty:
            print(f"warning: ignoring {len(empty)} class folder(s) without images in '{root}': {', '.join(empty)}")
        self.class_names = [d for d, files in images.items() if files]
        self.samples = [(os.path.join(root, c, f), label) for label, c in enumerate(self.class_names) for f in images[c]]
        if not self.samples:
            raise ValueError(f"no images found in '{root}': expected <class>/<image>{IMAGE_EXTENSIONS[0]} files "
                             f"(the ImageNet layout)")
        self.image_size, self.channels = image_size, 3

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                arr = center_crop_arr(to_rgb(im), self.image_size)
        except Exception as e:
            raise UnreadableImage(f"cannot read image '{path}' ({type(e).__name__}: {e}): "
                                  f"delete or replace the file and restart") from None
        return torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1, label  # (3, H, W) in [-1, 1]


def workers(n, log=print):
    """n data loader processes, or as many as this process has CPU cores if fewer: more would only compete for
    them (and torch warns of it twice, at the loader's creation and at its first batch)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if n > cores:
        log(f"warning: --num-workers {n} is more than the {cores} CPU core(s) here: using {cores}")
    return min(n, cores)


def load_dataset(path, image_size):
    """The embedded Fashion-MNIST when path is None, else an ImageFolder at path."""
    if path is None:
        return ArrayDataset(*load_embedded("train"), image_size)
    return ImageFolder(path, image_size)


class VAE:
    """A local diffusers AutoencoderKL folder (e.g. sd-vae-ft-ema): images <-> latents × 0.18215, as DiT.
    diffusers is imported only here, so pixel-space training never needs it."""

    def __init__(self, path, device):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"VAE folder '{path}' does not exist: pass --vae a local diffusers "
                                    f"AutoencoderKL folder (config.json + weights), e.g. sd-vae-ft-ema")
        try:
            from diffusers.models import AutoencoderKL
        except ImportError:
            raise ImportError("--vae needs the diffusers package: pip install diffusers") from None
        self.vae = AutoencoderKL.from_pretrained(path).to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def encode(self, x, noise):
        """A sample of the posterior, mean + std · noise, × 0.18215 (N, 4, H/8, W/8). noise (N, 4, H/8, W/8) is
        the standard normal draw, passed in (not latent_dist.sample()'s global RNG) so that train.py draws it
        with the step's other randomness: resumed and 1-vs-N-process runs stay exact."""
        if x.shape[1] == 1:  # greyscale data through an RGB autoencoder
            x = x.expand(-1, 3, -1, -1)
        dist = self.vae.encode(x).latent_dist
        return (dist.mean + dist.std * noise.to(dist.mean)) * VAE_SCALE

    @torch.no_grad()
    def decode(self, z):
        return self.vae.decode(z / VAE_SCALE).sample  # (N, 3, H, W) in about [-1, 1]


def save_grid(x, path, nrow=None):
    """Save images x (N, C, H, W) in [-1, 1] as one PNG grid (torchvision's save_image, without torchvision),
    written atomically: an interrupted save never leaves a half-written PNG."""
    from PIL import Image
    N, C, H, W = x.shape
    nrow = nrow or int(np.ceil(np.sqrt(N)))
    ncol = int(np.ceil(N / nrow))
    grid = torch.ones(C, ncol * (H + 2) + 2, nrow * (W + 2) + 2)
    for k in range(N):
        r, c = divmod(k, nrow)
        grid[:, 2 + r * (H + 2): 2 + r * (H + 2) + H, 2 + c * (W + 2): 2 + c * (W + 2) + W] = x[k].float().cpu()
    arr = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    with cli.atomic_write(path) as f:
        Image.fromarray(arr[..., 0] if C == 1 else arr).save(f, format="PNG")
