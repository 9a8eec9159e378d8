"""In-memory image datasets for the training CLI: Fashion-MNIST (idx files), CIFAR-10/100 (python
pickles) and a synthetic set. Nothing is downloaded: a missing dataset raises with how to get it."""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("fashion-mnist", "cifar10", "cifar100", "synthetic")


@dataclass
class ImageData:
    train_x: Tensor  # float32 [N, C, H, W], normalised
    train_y: Tensor  # int64 [N]
    test_x: Tensor
    test_y: Tensor
    num_classes: int

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]


def read_idx(path: str) -> np.ndarray:
    """Read an idx file (optionally gzip-compressed): the format of the MNIST family."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        zero, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"{path} is not an idx file of unsigned bytes")
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {data.size} bytes")
    return data.reshape(shape)


def _normalise(images: np.ndarray, mean: Tensor, std: Tensor) -> Tensor:
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def fashion_mnist(data_dir: str = FASHION_MNIST_DIR) -> ImageData:
    def path(name):
        for candidate in (name + ".gz", name):
            full = os.path.join(data_dir, candidate)
            if os.path.exists(full):
                return full
        raise FileNotFoundError(
            f"Fashion-MNIST file {name}(.gz) not found in {data_dir}. Install Debian's package "
            f"`dataset-fashion-mnist` (apt-get install dataset-fashion-mnist) or pass --data-dir with the idx files.")

    mean, std = torch.tensor([0.2860]), torch.tensor([0.3530])
    images = {split: read_idx(path(f"{split}-images-idx3-ubyte"))[:, None] for split in ("train", "t10k")}
    labels = {split: torch.from_numpy(read_idx(path(f"{split}-labels-idx1-ubyte")).astype(np.int64))
              for split in ("train", "t10k")}
    return ImageData(_normalise(images["train"], mean, std), labels["train"],
                     _normalise(images["t10k"], mean, std), labels["t10k"], 10)


def cifar(data_dir: str, num_classes: int) -> ImageData:
    """The python-pickle CIFAR folders (cifar-10-batches-py, cifar-100-python)."""
    if num_classes == 10:
        train_files, test_files, label_key = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"
    else:
        train_files, test_files, label_key = ["train"], ["test"], b"fine_labels"

    def load(files):
        xs, ys = [], []
        for name in files:
            full = os.path.join(data_dir, name)
            if not os.path.exists(full):
                raise FileNotFoundError(f"CIFAR-{num_classes} file {full} not found: pass --data-dir with the "
                                        f"python version of the dataset (its folder of pickled batches)")
            with open(full, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[label_key], dtype=np.int64))
        return np.concatenate(xs), torch.from_numpy(np.concatenate(ys))

    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2470, 0.2435, 0.2616])
    (train_x, train_y), (test_x, test_y) = load(train_files), load(test_files)
    return ImageData(_normalise(train_x, mean, std), train_y, _normalise(test_x, mean, std), test_y, num_classes)


def synthetic(num_train: int = 512, num_test: int = 256, num_classes: int = 10, channels: int = 3,
              size: int = 16, seed: int = 0) -> ImageData:
    """Learnable random data: each class is a fixed random pattern plus noise (for smoke runs)."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(num_classes, channels, size, size, generator=g)

    def draw(n):
        y = torch.randint(0, num_classes, (n,), generator=g)
        return patterns[y] + 0.5 * torch.randn(n, channels, size, size, generator=g), y

    (train_x, train_y), (test_x, test_y) = draw(num_train), draw(num_test)
    return ImageData(train_x, train_y, test_x, test_y, num_classes)


def load_dataset(name: str, data_dir: str = None) -> ImageData:
    if name == "fashion-mnist":
        return fashion_mnist(data_dir or FASHION_MNIST_DIR)
    if name in ("cifar10", "cifar100"):
        if data_dir is None:
            raise ValueError(f"--data {name} needs --data-dir (the folder of the python-pickle batches)")
        return cifar(data_dir, 10 if name == "cifar10" else 100)
    if name == "synthetic":
        return synthetic()
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
