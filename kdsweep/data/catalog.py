"""The dataset names and their one-line summaries, without torch: what the command line needs to build its help.

`kdsweep --help` and argument errors must not pay for importing torch (over a second, hundreds of MB);
builtin.py holds the loaders and is checked against this list in tests/test_clients.py.
"""

DATASET_SUMMARIES: dict[str, str] = {
    "cifar10": "CIFAR-10 (torchvision), 50k train / 10k test, crop+flip",
    "cifar100": "CIFAR-100 (torchvision), 100 classes, crop+flip",
    "mnist": "MNIST (torchvision), Hinton's MLP pair",
    "digits": "scikit-learn's bundled 8x8 digits: real, offline, seconds on CPU",
    "mnist1d": "MNIST-1D (Greydanus & Kobak 2024), generated offline: 4k train / 1k test signals; paper's CNN/MLP",
    "synthetic": "generated CIFAR-shaped data (size: --data-size, default 5000): tests and benchmarks",
}

DATASET_NAMES = tuple(DATASET_SUMMARIES)
