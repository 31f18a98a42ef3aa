"""The feature network behind every published FID: Inception-v3 of 2015-12-05, as a TorchScript file.

Which file and why
------------------
EDM's `fid.py` downloads `inception-2015-12-05.pkl` (StyleGAN3's metrics folder on NGC) and opens it with a plain
`pickle.load`, which can run arbitrary code. NVIDIA publishes the same network -- described in their metric code as
a "direct TorchScript translation" of TensorFlow's `inception-2015-12-05.tgz` graph -- as a TorchScript archive,
`inception-2015-12-05.pt` (StyleGAN2-ADA metrics). We load that archive with `torch.jit.load`: the archive holds
TorchScript code and tensors only, which cannot import or run arbitrary Python. Its forward is
`forward(img: uint8 [N,3,H,W], return_features=False, use_fp16=False, no_output_bias=False)`; it resizes to
299x299 and normalises internally, and returns pool features [N, 2048] with `return_features=True`, else the
softmax over 1008 classes (with `no_output_bias=True` for the Inception Score, as StyleGAN's IS does).
Python pickles (`.pkl`) are refused with an error that names the `.pt` URL.

Any other detector (`--detector PATH|URL`) is a TorchScript module called as
`detector(uint8 NCHW, return_features=True) -> [N, D]`.
"""

import os
import warnings
from typing import Optional

import torch

from pid.download import cached_path, is_url
from pid.errors import CheckpointError, ConfigError, DataError

__all__ = ["INCEPTION_URL", "EDM_INCEPTION_PKL_URL", "Detector", "load_detector"]

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
EDM_INCEPTION_PKL_URL = ("https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/"
                         "metrics/inception-2015-12-05.pkl")


class Detector:
    """A loaded TorchScript feature network on one device.

    `features(uint8 [N,C,H,W]) -> float64 [N, D]`; `probs(...) -> float64 [N, K]` when the network has the
    Inception interface (`no_output_bias` argument), used for the Inception Score.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device, source: str):
        self.module = module
        self.device = torch.device(device)
        self.source = source
        try:
            args = [a.name for a in module.forward.schema.arguments]
        except AttributeError:  # a plain nn.Module (tests, library use): assume the generic interface
            args = []
        self.has_probs = "no_output_bias" in args

    def _call(self, images: torch.Tensor, **kwargs) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(f"Detector input must be uint8 [N, C, H, W]; got {images.dtype} {list(images.shape)}.")
        if images.shape[1] == 1:  # grayscale: EDM repeats the channel
            images = images.repeat([1, 3, 1, 1])
        with torch.no_grad():
            try:
                out = self.module(images.to(self.device), **kwargs)
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise DataError(f"Detector '{self.source}' failed on uint8 images {list(images.shape)}: {first}") \
                    from None
        if not torch.is_tensor(out) or out.ndim != 2 or out.shape[0] != images.shape[0]:
            shape = list(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise DataError(f"Detector '{self.source}' must return [N, D] features for N images; got {shape}.")
        return out.to(torch.float64)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, C, H, W] (0..255, native resolution, exactly as EDM passes them) -> float64 [N, D]."""
        return self._call(images, return_features=True)

    def probs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, C, H, W] -> class probabilities float64 [N, K] (softmax without the output bias)."""
        self.require_probs()
        return self._call(images, no_output_bias=True)

    def require_probs(self) -> None:
        """Raise ConfigError (with the fix) unless this detector can give class probabilities."""
        if not self.has_probs:
            raise ConfigError(f"Detector '{self.source}' has no class output (no `no_output_bias` argument), so "
                              f"it cannot give an Inception Score; use the Inception detector ({INCEPTION_URL}).")


def _check_not_pickle(local: str, spec: str) -> None:
    with open(local, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":  # TorchScript archives are zip files
        return
    hint = f" EDM's {os.path.basename(EDM_INCEPTION_PKL_URL)} is the same network as {INCEPTION_URL}." \
        if spec.endswith(".pkl") else ""
    raise CheckpointError(f"Detector '{spec}' is not a TorchScript archive (.pt zip). Python pickles are not loaded "
                          f"because unpickling can run arbitrary code.{hint} Pass a TorchScript file instead.")


def load_detector(spec: Optional[str] = None, device: Optional[torch.device] = None) -> Detector:
    """Load a TorchScript feature network from a path or URL (cached download); default: Inception 2015-12-05.

    Offline with nothing cached, raises DownloadError naming the URL and the cache path to fill by hand.
    A missing, corrupt or non-TorchScript file raises CheckpointError.
    """
    spec = spec or INCEPTION_URL
    # this process's own GPU (torchrun's set_device), never cuda:0 for every rank
    device = torch.device(device or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"))
    local = cached_path(spec) if is_url(spec) else spec
    if not os.path.isfile(local):
        raise CheckpointError(f"Detector file '{spec}' not found: give a TorchScript .pt path or URL "
                              f"(default: {INCEPTION_URL}).")
    _check_not_pickle(local, spec)
    try:
        with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated; the format still loads
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(local, map_location=device)
    except Exception as exc:  # torch raises RuntimeError/ValueError variants for a damaged archive
        fix = f" Delete the cached copy {local} to download it again." if local != spec else ""
        raise CheckpointError(f"Cannot load detector '{spec}' as TorchScript ({type(exc).__name__}); the file "
                              f"is corrupt or not a TorchScript module.{fix}") from None
    return Detector(module.eval(), device, spec)
