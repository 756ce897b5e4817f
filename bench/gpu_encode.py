"""CUDA encode figure for `make bench`, run on a lent GPU machine (not part of the test suite).

Encodes a folder of real images with the offline default's image tower through the same
pipeline as every node (:func:`shared.data.features.encode_samples`), on CUDA, and reports images/s
end to end (JPEG decode + preprocessing + forward) and for the forward pass alone. If a CPU
reference (``--reference``, written by ``--make-reference`` on a CPU machine) is given, the CUDA
features are checked against it, so the CUDA path is verified, not only timed.

The text tower is not needed for image features, so this runs where the MiniLM package is not
installed (:func:`shared.backbone.offline_image_tower` is the same tower, seed for seed).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.backbone import Backbone, BackboneSpec, offline_image_tower, offline_preprocess
from shared.data import scan_image_folder
from shared.data.features import encode_samples


class _ImageOnly(nn.Module):
    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


def image_only_backbone(device: str) -> Backbone:
    model = _ImageOnly(offline_image_tower(seed=0)).to(device)
    return Backbone(
        spec=BackboneSpec(),
        model=model,
        preprocess=offline_preprocess(),
        tokenizer=None,
        description="EfficientNet-Lite0 image tower (offline default), image side only",
        is_clip=False,
        weights_id="",
        preprocess_id="",
        device=torch.device(device),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, help="ImageFolder of real images")
    p.add_argument("--reference", help="npz with CPU features (hashes, features) to compare against")
    p.add_argument("--make-reference", help="write CPU features of --images to this npz and exit")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--out", default="gpu_encode.json")
    args = p.parse_args(argv)
    samples = scan_image_folder(args.images).samples
    if args.make_reference:
        feats, _ = encode_samples(image_only_backbone("cpu"), samples, None, batch_size=64)
        np.savez(args.make_reference, hashes=np.array([s.sha256 for s in samples]), features=feats.numpy())
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    backbone = image_only_backbone("cuda")
    encode_samples(
        backbone, samples[: args.batch_size], None, batch_size=args.batch_size, num_workers=args.workers, progress=False
    )  # warm-up: cuDNN autotuning, worker start
    torch.cuda.synchronize()
    feats, stats = encode_samples(backbone, samples, None, batch_size=args.batch_size, num_workers=args.workers)
    batch = torch.randn(args.batch_size, 3, 224, 224, device="cuda")
    with torch.no_grad():
        for _ in range(3):
            backbone.model.encode_image(batch)
        torch.cuda.synchronize()
        start = time.perf_counter()
        reps = 20
        for _ in range(reps):
            backbone.model.encode_image(batch)
        torch.cuda.synchronize()
        forward_ips = reps * args.batch_size / (time.perf_counter() - start)
    result = {
        "device_name": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "images": len(samples),
        "batch_size": args.batch_size,
        "workers": args.workers,
        "images_per_second": stats.images_per_second,
        "forward_only_images_per_second": forward_ips,
    }
    if args.reference:
        with np.load(args.reference) as ref:
            order = {h: i for i, h in enumerate(ref["hashes"])}
            expected = torch.from_numpy(ref["features"][[order[s.sha256] for s in samples]])
        diff = (feats - expected).abs()
        cos = torch.nn.functional.cosine_similarity(feats, expected, dim=-1)
        result.update(
            max_abs_diff_vs_cpu=float(diff.max()),
            min_cosine_vs_cpu=float(cos.min()),
            feature_scale=float(expected.abs().mean()),
        )
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
