"""Write test images as PNG files, named <index>_<class>.png, to try `deploy.py classify` on.

    python tools/save_test_images.py --n 3 --out deploy/images
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
from cli import UserError, check_output_dir, opt, parse_config, run_main  # noqa: E402


@dataclass
class SaveConfig:
    n: int = opt(3, "number of test images")
    start: int = opt(0, "index of the first test image")
    out: str = opt("deploy/images", "folder for the PNG files")
    data_dir: str | None = opt(None, "CIFAR-10 location (default: $CIFAR10_DIR, else ./data)")

    def __post_init__(self):
        if self.n < 1:
            raise UserError("--n must be >= 1")
        check_output_dir(self.out, "--out")


def main(argv=None) -> list[Path]:
    from PIL import Image

    cfg = parse_config(SaveConfig, argv, __doc__.split("\n")[0])
    test = data.dataset("test", cfg.data_dir, n=cfg.n, start=cfg.start)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for j in test.indices:
        p = out / f"{j}_{data.CLASSES[test.arrays.labels[j]]}.png"
        Image.fromarray(test.arrays.images[j]).save(p)
        paths.append(p)
        print(p)
    return paths


if __name__ == "__main__":
    run_main(main)
