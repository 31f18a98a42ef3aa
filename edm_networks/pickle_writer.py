"""Write pickles in NVIDIA EDM's persistence format from our networks (docs/edm.md §5).

Used by the tests (valid and hostile files) and by `pid.make_teacher`, which ships the built-in network teachers
as ordinary EDM pickles that load through `load_network_pickle` exactly as a user's file does.

The layout mirrors what EDM's export writes (protocol 4; globals and opcodes as measured in
``edm_vectors/pickle_format.json``): every network object is ``_reconstruct_persistent_obj(meta)`` with
``meta = {type, version, module_src, class_name, state}``, ``enc``/``dec`` are ``ModuleDict`` objects
(NEWOBJ + BUILD), tensors go through torch's own ``_rebuild_parameter`` / ``_rebuild_tensor_v2`` /
``_load_from_bytes`` reducers, and float constants are numpy float64 scalars. The embedded module source is a
placeholder string, never EDM's code. Names are written without importing them, which also lets the tests
build hostile pickles (``os.system``, ``builtins.eval``, unknown persistent classes). Imports torch and numpy only.
"""

from __future__ import annotations

import collections
import copy
import copyreg
import io
import pickle
import pickletools
import warnings
from typing import Any, Optional

import numpy as np
import torch

# Long enough (> 255 characters) to be written with BINUNICODE, as EDM's real module sources are.
PLACEHOLDER_SOURCE = (
    "# Placeholder for the module source that EDM's persistence decorator embeds in every pickle.\n"
    "# It was written by pid's pickle writer and contains no code from EDM. A safe loader must never\n"
    "# execute it; EDM's own loader would exec() whatever text stands here.\n")
# Module attributes of torch 1.12 (the release era): fewer hook dicts than today's torch.
TORCH112_MODULE_KEYS = ("training", "_parameters", "_buffers", "_non_persistent_buffers_set", "_backward_hooks",
                        "_is_full_backward_hook", "_forward_hooks", "_forward_pre_hooks", "_state_dict_hooks",
                        "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_modules")
_NUMPY_FLOAT_KEYS = ("skip_scale", "init_weight", "init_bias")  # EDM computes these with np.sqrt
_PLAIN = (bool, int, float, str, type(None))


class GlobalRef:
    """A module-level name written to the pickle as a global, without importing it."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # pickle wants reducer functions to be callable
        raise RuntimeError("GlobalRef is only a pickle marker")


RECONSTRUCT = GlobalRef("torch_utils.persistence", "_reconstruct_persistent_obj")


class Reduced:
    """Pickles as ``func(*args)``, followed by BUILD(state) when a state is given."""

    def __init__(self, func: Any, args: tuple, state: Any = None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self) -> tuple:
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


class ModuleDictRecord:
    """Pickles like ``torch.nn.ModuleDict`` does: NEWOBJ of the class, then BUILD with its attribute dict."""

    _pickle_as = ("torch.nn.modules.container", "ModuleDict")

    def __init__(self, state: dict):
        self.state = state

    def __reduce_ex__(self, protocol: int) -> tuple:
        return copyreg.__newobj__, (type(self),), self.state


def persistent(class_name: str, state: dict, module_src: str = PLACEHOLDER_SOURCE) -> Reduced:
    """An EDM persistent object: ``_reconstruct_persistent_obj({type, version, module_src, class_name, state})``."""
    meta = dict(type="class", version=6, module_src=module_src, class_name=class_name, state=state)
    return Reduced(RECONSTRUCT, (meta,))


class EdmPickler(pickle._Pickler):
    """Pure-Python pickler that writes globals by name (GlobalRef, ``_pickle_as``), optionally numpy-1.x style."""

    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file: Any, protocol: int = 4, numpy1: bool = False):
        super().__init__(file, protocol=protocol)
        self.numpy1 = numpy1

    def save_global(self, obj: Any, name: Optional[str] = None) -> None:
        module, name = getattr(obj, "_pickle_as", (None, name))
        if module is None:
            name = name or getattr(obj, "__qualname__", None) or obj.__name__
            module = pickle.whichmodule(obj, name)
        if self.numpy1 and module.startswith("numpy._core"):
            module = "numpy.core" + module[len("numpy._core"):]
        self._write_global(obj, module, name)

    def _write_global(self, obj: Any, module: str, name: str) -> None:
        if self.proto >= 4:
            self.save(module)
            self.save(name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + module.encode() + b"\n" + name.encode() + b"\n")
        self.memoize(obj)

    def _save_ref(self, obj: GlobalRef) -> None:
        self._write_global(obj, obj.module, obj.name)

    dispatch[GlobalRef] = _save_ref


def dump(obj: Any, file: Any, protocol: int = 4, numpy1: bool = False) -> None:
    """Pickle ``obj`` (records from this module, plain data, tensors) to a binary file, as EDM writes it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's TypedStorage deprecation notes while reducing storages
        EdmPickler(file, protocol=protocol, numpy1=numpy1).dump(obj)


def dumps(obj: Any, protocol: int = 4, numpy1: bool = False) -> bytes:
    """Like ``dump``, returning the bytes."""
    buf = io.BytesIO()
    dump(obj, buf, protocol, numpy1)
    return buf.getvalue()


def _numpyfy(key: Any, value: Any) -> Any:
    """Mimic EDM's numpy float64 constants (np.sqrt results) inside attributes and init kwargs."""
    if isinstance(value, dict):
        return {k: _numpyfy(k, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_numpyfy(None, v) for v in value)
    if key in _NUMPY_FLOAT_KEYS and type(value) is float and value != int(value):
        return np.float64(value)
    return value


def module_record(module: torch.nn.Module, module_src: str = PLACEHOLDER_SOURCE,
                  torch112: bool = False, init_kwargs: Optional[dict] = None) -> Any:
    """Convert one of our modules (recursively) into EDM's persistent-object layout.

    ``torch112`` keeps only the attribute keys torch 1.12 modules had. ``init_kwargs`` overrides the
    recorded constructor arguments of this (top) module; submodules use their own ``init_kwargs``.
    """
    state: dict = {}
    for key, value in module.__dict__.items():
        if torch112 and key.startswith("_") and key not in TORCH112_MODULE_KEYS:
            continue
        if key == "_modules":
            state[key] = collections.OrderedDict(
                (n, None if c is None else module_record(c, module_src, torch112)) for n, c in value.items())
        elif key in ("_parameters", "_buffers"):
            state[key] = collections.OrderedDict(value)
        elif key.startswith("_"):
            state[key] = copy.copy(value)  # empty hook dicts, the non-persistent buffer set, flags
        elif key != "init_kwargs" and isinstance(value, _PLAIN + (list, tuple, dict)):
            state[key] = _numpyfy(key, value)
    if isinstance(module, torch.nn.ModuleDict):
        return ModuleDictRecord(state)
    kwargs = init_kwargs if init_kwargs is not None else _numpyfy(None, getattr(module, "init_kwargs", {}))
    state["_init_args"], state["_init_kwargs"] = (), copy.deepcopy(kwargs)
    return persistent(type(module).__name__, state, module_src)


def loss_record(class_name: str = "EDMLoss", module_src: str = PLACEHOLDER_SOURCE) -> Reduced:
    """A persistent loss object as in EDM snapshots (plain attributes, no tensors)."""
    attrs = {"EDMLoss": dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5),
             "VPLoss": dict(beta_d=19.9, beta_min=0.1, epsilon_t=1e-5),
             "VELoss": dict(sigma_min=0.02, sigma_max=100)}[class_name]
    return persistent(class_name, {**attrs, "_init_args": (), "_init_kwargs": {}}, module_src)


def augment_record(module_src: str = PLACEHOLDER_SOURCE) -> Reduced:
    """A persistent AugmentPipe object with train.py's settings (p=0.12, geometric ops only)."""
    kwargs = dict(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    attrs = dict(kwargs, rotate_int=0, translate_int=0, translate_int_max=0.125, scale_std=0.2,
                 rotate_frac_max=1, aniso_std=0.2, aniso_rotate_prob=0.5, translate_frac_std=0.125)
    return persistent("AugmentPipe", {**attrs, "_init_args": (), "_init_kwargs": kwargs}, module_src)


def snapshot(net: torch.nn.Module, *, init_kwargs: Optional[dict] = None, loss: str = "EDMLoss",
             augment: bool = True, module_src: str = PLACEHOLDER_SOURCE, torch112: bool = False) -> dict:
    """The top-level dict of ``network-snapshot-*.pkl``: ema, loss_fn, augment_pipe, dataset_kwargs."""
    ema = copy.deepcopy(net).eval().requires_grad_(False).cpu()  # as EDM exports it
    return {
        "ema": module_record(ema, module_src, torch112, init_kwargs),
        "loss_fn": loss_record(loss, module_src),
        "augment_pipe": augment_record(module_src) if augment else None,
        "dataset_kwargs": dict(class_name="training.dataset.ImageFolderDataset", path="datasets/x.zip",
                               use_labels=True, xflip=False, cache=True,
                               resolution=int(getattr(net, "img_resolution", 16)), max_size=1000),
    }


def snapshot_bytes(net: torch.nn.Module, *, release_era: bool = False, **kwargs: Any) -> bytes:
    """A whole snapshot pickle; ``release_era`` writes numpy-1.x names and torch-1.12 attribute sets."""
    return dumps(snapshot(net, torch112=release_era, **kwargs), numpy1=release_era)


def scan(data: bytes) -> tuple:
    """Static scan of a pickle: ``(Counter of 'module.name' globals, set of opcode names)``. Runs nothing."""
    globals_, opcodes, memo, strings = collections.Counter(), set(), {}, []
    last: Any = None
    for op, arg, _ in pickletools.genops(data):
        opcodes.add(op.name)
        pushed = None
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
            pushed = arg
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            pushed = memo.get(arg)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = last
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = last
        elif op.name == "STACK_GLOBAL":
            globals_[f"{strings[-2]}.{strings[-1]}"] += 1
        elif op.name in ("GLOBAL", "INST"):
            globals_[arg.replace(" ", ".")] += 1
        if op.name not in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT", "FRAME"):
            last = pushed
            if pushed is not None:
                strings.append(pushed)
    return globals_, opcodes


def main() -> None:
    """Write a random-init preset network as an EDM-format snapshot pickle (for trying things offline)."""
    import argparse

    from edm_networks.presets import build_preset, list_presets

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--preset", required=True, choices=list_presets())
    parser.add_argument("--out", required=True, help="output .pkl path")
    parser.add_argument("--seed", type=int, default=0, help="torch seed for the random initialisation")
    parser.add_argument("--release-era", action="store_true", help="numpy-1.x names, torch-1.12 attribute sets")
    opts = parser.parse_args()
    torch.manual_seed(opts.seed)
    net = build_preset(opts.preset)
    with open(opts.out, "wb") as f:
        dump(snapshot(net, torch112=opts.release_era, augment="imagenet" not in opts.preset), f,
             numpy1=opts.release_era)
    print(f"wrote {opts.out}: {type(net).__name__}, {sum(p.numel() for p in net.parameters()):,} parameters")


if __name__ == "__main__":
    main()
