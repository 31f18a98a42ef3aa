"""Installation script for pid: Physics Informed Distillation of EDM diffusion teachers."""

from setuptools import find_packages, setup

setup(
    name="pid",
    version="0.1.0",
    description="Distill NVIDIA EDM diffusion teachers into one-step (PID) and few-step (moment matching) generators.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",  # PEP 604 unions (str | None) are evaluated at run time in places
    packages=find_packages(include=["pid", "pid.*", "edm_networks", "edm_networks.*"]),
    py_modules=["train_pid", "train_mm", "sample", "fid", "report"],
    # the built-in network teachers (EDM network pickles made by `python -m pid.make_teacher`) and their sha256 sums
    package_data={"pid": ["assets/*.pkl", "assets/SHA256SUMS", "assets/*.json"]},
    install_requires=[
        "torch>=2.6",  # torch.nn.utils.get_total_norm / clip_grads_with_norm_, torch.func.jvp over functional_call
        "torchvision",
        "lpips",
        "numpy",
        "click",
        "pillow",
        "scipy",
        "tqdm",
        "matplotlib",  # report.py and the report.png every training run writes by default (--plot=true)
    ],
    extras_require={
        "tensorboard": ["tensorboard"],  # --tensorboard=true: torch.utils.tensorboard's writer needs it
        # piq: the PID reference's LPIPS (tests/test_distances.py); tensorboard: the --tensorboard tests run, not skip
        "test": ["pytest", "piq", "tensorboard"],
    },
)
