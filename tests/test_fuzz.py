"""Seeded fuzzers: the EDM pickle loader and the CLIs' path and number options.

Loader: mutated, truncated and spliced EDM-format pickles, deep and shared nesting, huge claimed sizes. Every
case must end within a time bound with a correct load or a NetworkPickleError, import nothing and run
nothing. CLIs: every value ends with exit 0, or exit 1 and exactly one `Error:` line; never a traceback.
The generators are seeded, so each run tests the same cases (counts and times: BENCHMARKS.md).
"""

import io
import os
import pickle
import random
import re
import struct
import sys
import time

import pytest
import torch
from click.testing import CliRunner

import edm_networks
from edm_networks import NetworkPickleError, load_network_pickle
from edm_networks.pickle_writer import dumps, snapshot

CASE_SECONDS = 5.0   # bound per case; typical cases take milliseconds


@pytest.fixture(scope="module")
def base_pickle() -> bytes:
    torch.manual_seed(0)
    net = edm_networks.EDMPrecond(img_resolution=8, img_channels=3, label_dim=4, augment_dim=9,
                                  model_type="SongUNet", model_channels=8, channel_mult=[1, 2], num_blocks=1,
                                  attn_resolutions=[4], dropout=0.0).eval()
    return dumps(snapshot(net))


def _load_case(data: bytes) -> str:
    """Load one fuzzed file: 'ok' or 'error'; anything else (a crash, an import, a slow case) fails."""
    modules = set(sys.modules)
    start = time.perf_counter()
    try:
        out = load_network_pickle(io.BytesIO(data))
        assert isinstance(out, dict) and isinstance(out["ema"], torch.nn.Module)
        outcome = "ok"
    except NetworkPickleError as exc:
        assert str(exc) and "\n" not in str(exc)
        outcome = "error"
    assert time.perf_counter() - start < CASE_SECONDS
    assert set(sys.modules) == modules, "loading imported a module"
    return outcome


def _mutations(data: bytes, rng: random.Random, count: int):
    """Byte flips, random-byte overwrites, deletions, duplications and truncations of a valid pickle."""
    for _ in range(count):
        b = bytearray(data)
        kind = rng.randrange(5)
        pos = rng.randrange(2, len(b))
        if kind == 0:
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(2, len(b))] ^= 1 << rng.randrange(8)
        elif kind == 1:
            b[pos:pos + 4] = bytes(rng.randrange(256) for _ in range(4))
        elif kind == 2:
            del b[pos:pos + rng.randint(1, 64)]
        elif kind == 3:
            b[pos:pos] = b[pos:pos + rng.randint(1, 64)]
        else:
            del b[pos:]
        yield bytes(b)


def test_mutated_and_truncated_pickles(base_pickle):
    rng = random.Random(16)
    start = time.perf_counter()
    outcomes = [_load_case(case) for case in _mutations(base_pickle, rng, 400)]
    print(f"loader: 400 mutated/truncated cases ({outcomes.count('ok')} loaded, {outcomes.count('error')} "
          f"refused) in {time.perf_counter() - start:.1f} s")
    assert outcomes.count("error") > 300   # most mutations break the file; the rest must load correctly


def _wrap(value_ops: bytes) -> bytes:
    """A protocol-4 pickle of {'ema': <value built by value_ops>}."""
    return b"\x80\x04}\x8c\x03ema" + value_ops + b"s."


def _structured_cases():
    deep_list = b"]" * 100_000 + b"a" * 99_999                  # lists nested 100 000 deep
    deep_dict = (b"}\x8c\x01k" * 50_000) + b"N" + b"s" * 50_000   # dicts nested 50 000 deep
    deep_tuple = b"(" * 50_000 + b"N" + b"t" * 50_000             # tuples via MARK ... TUPLE
    shared = bytearray(b"\x8c\x03lol\x94")                        # memo 0 = 'lol'
    for level in range(1, 100):                                    # memo i = (memo i-1, memo i-1): 2^99 items
        get = b"j" + struct.pack("<I", level - 1)
        shared += get + get + b"\x86\x94"
    cases = {
        "deep lists": _wrap(deep_list),
        "deep dicts": _wrap(deep_dict),
        "deep tuples": _wrap(deep_tuple),
        "shared tuples 2^99": _wrap(bytes(shared)),
        "BINBYTES8 2^62": b"\x80\x04\x8e" + struct.pack("<Q", 2 ** 62) + b"x" * 16 + b".",
        "BINUNICODE8 2^40": b"\x80\x04\x8d" + struct.pack("<Q", 2 ** 40) + b"x" * 16 + b".",
        "BINBYTES 2^31": b"\x80\x04B" + struct.pack("<I", 2 ** 31 - 1) + b"x" * 16 + b".",
        "FRAME 2^62": b"\x80\x04\x95" + struct.pack("<Q", 2 ** 62) + b"N.",
        "LONG4 2^31": b"\x80\x04\x8b" + struct.pack("<i", 2 ** 31 - 1) + b"\x01" * 16 + b".",
        "BYTEARRAY8 2^50": b"\x80\x05\x96" + struct.pack("<Q", 2 ** 50) + b"x" * 16 + b".",
        "memo get unknown": b"\x80\x04h\x07.",
        "stack underflow": b"\x80\x04s.",
        "empty after header": b"\x80\x04",
        "global os.system": b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c\x04true\x85R.",
        "ext registry": b"\x80\x04\x82\x01.",
        "persistent id": b"\x80\x04\x8c\x01x\x94Q.",
    }
    return cases


def test_structured_hostile_pickles():
    for name, data in _structured_cases().items():
        assert _load_case(data) == "error", name


def _storage_count_offsets(data: bytes) -> list:
    """Offsets of the int64 element counts in the storage payloads (after each payload's key-list pickle)."""
    offsets = []
    for m in re.finditer(rb"\x80\x02\]q\x00X", data):
        (key_len,) = struct.unpack("<I", data[m.end():m.end() + 4])
        offsets.append(m.end() + 4 + key_len + len(b"q\x01a."))
    return offsets


def test_storage_payloads_claiming_huge_element_counts(base_pickle):
    """The element count inside a storage payload is checked against the payload before allocating."""
    offsets = _storage_count_offsets(base_pickle)
    assert len(offsets) > 50
    rng = random.Random(7)
    for numel in (2 ** 62, 2 ** 40, 2 ** 31, 10 ** 9, -1):
        for pos in rng.sample(offsets, 10):
            data = bytearray(base_pickle)
            data[pos:pos + 8] = struct.pack("<q", numel)
            assert _load_case(bytes(data)) == "error"


def test_pickle_of_plain_python_objects_is_refused_without_running_them():
    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    for obj in ({"ema": Boom()}, {"ema": [Boom()] * 3}, Boom()):
        assert _load_case(pickle.dumps(obj, protocol=4)) == "error"


# ----------------------------------------------------------------------------------------------- CLIs
def _assert_clean(result, case) -> int:
    assert result.exit_code in (0, 1), (case, result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output, (case, result.output)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{case}: {type(result.exception).__name__}: {result.exception}")
    if result.exit_code == 1:
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, (case, result.output)
    return result.exit_code


def _number_texts(rng: random.Random, count: int) -> list:
    fixed = ["0", "-1", "1", "-0", "1e9", "99999999999999999999", "nan", "inf", "-inf", "", " ", "0x10", "1.5",
             "1,2", "abc", "1e400", "٣", "-99999999999"]
    return fixed + [rng.choice(["", "-"]) + str(rng.randint(0, 10 ** rng.randint(0, 25))) for _ in range(count)]


def _seed_texts(rng: random.Random, count: int) -> list:
    fixed = ["0-99999999999", "5-2", "0--1", "-1", "1,,2", ",", "0-9,x", "0-63", "18446744073709551616",
             "0-9999999", "1-1"]
    out = []
    for _ in range(count):
        lo = rng.randint(0, 10 ** rng.randint(0, 20))
        out.append(f"{lo}-{lo + rng.choice([-1, 0, 3, 10 ** 7, 10 ** 12])}")
    return fixed + out


@pytest.fixture
def fake_sampling(monkeypatch):
    """sample.py with a tiny stand-in generator, so the fuzzer tests option handling, not the networks."""
    import sample

    class Tiny(torch.nn.Module):
        img_channels, img_resolution, label_dim = 1, 4, 3

        def generate(self, latents, labels=None):
            return torch.zeros_like(latents)

    monkeypatch.setattr(sample, "load_generator", lambda spec, device: (Tiny(), True))
    return sample


def test_sample_cli_numbers_and_paths(tmp_path, fake_sampling):
    rng = random.Random(16)
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "adir").mkdir()
    paths = {"--outdir": [afile, afile / "x", tmp_path / "adir", tmp_path / "new" / "deeper", "", "/dev/null",
                          tmp_path / ("n" * 300)],
             "--grid": [tmp_path / "adir", tmp_path / "g", afile / "g.png", tmp_path / "g.png", "", "/dev/null",
                        tmp_path / "g.PNG", tmp_path / ("n" * 300 + ".png")],
             "--npz": [tmp_path / "adir", tmp_path / "x.txt", afile / "x.npz", tmp_path / "x.npz", "",
                       tmp_path / ("n" * 300 + ".npz")]}
    cases = [["--seeds", s, "--npz", str(tmp_path / "s.npz")] for s in _seed_texts(rng, 40)
             if not _many_valid_seeds(s)]
    for option in ("--batch", "--steps", "--class", "--sigma_min", "--rho", "--S_churn"):
        cases += [[option, v, "--seeds=0-3", "--npz", str(tmp_path / "s.npz")] for v in _number_texts(rng, 10)]
    for option, values in paths.items():
        cases += [[option, str(v), "--seeds=0-3"] for v in values]
    start, codes = time.perf_counter(), []
    for args in cases:
        case_start = time.perf_counter()
        codes.append(_assert_clean(CliRunner().invoke(fake_sampling.main, ["--ckpt=builtin:x", *args]), args))
        assert time.perf_counter() - case_start < CASE_SECONDS, args
    print(f"sample.py: {len(cases)} cases ({codes.count(0)} ran, {codes.count(1)} refused) in "
          f"{time.perf_counter() - start:.1f} s")
    assert codes.count(0) > 20 and codes.count(1) > 100


def _many_valid_seeds(text: str) -> bool:
    """Seed lists that are valid but long (they would sample up to 10^7 images): not a parsing case."""
    from pid.errors import ConfigError
    from pid.seeds import parse_seeds
    try:
        return len(parse_seeds(text)) > 1000
    except ConfigError:
        return False


def test_train_cli_numbers_and_paths(tmp_path, monkeypatch):
    """train_pid.py up to the start of training (a stand-in `train` validates the config and returns)."""
    import pid.training
    import train_pid
    from pid.training.entry import TrainResult

    def fake_train(config, method, student, **kwargs):
        config.validate(1)
        os.makedirs(config.outdir, exist_ok=True)
        return TrainResult(config.outdir)

    monkeypatch.setattr(pid.training, "train", fake_train)
    rng = random.Random(16)
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = []
    for option in ("--steps", "--batch", "--batch-gpu", "--lr", "--ema", "--betas", "--seed", "--snap",
                   "--keep-states", "--warmup", "--grad-clip", "--discretization", "--rho", "--sigma-min",
                   "--sigma-max", "--huber-c", "--default-ema", "--log-every"):
        cases += [[option, v] for v in _number_texts(rng, 3)]
    cases += [["--outdir", str(p)] for p in (afile, afile / "x", tmp_path / "ok", "")]
    cases += [["--resume", str(p)] for p in (afile, tmp_path / "missing", tmp_path, "auto")]
    cases += [["--teacher", str(p)] for p in (afile, tmp_path / "missing.pkl", tmp_path, "builtin:nope")]
    random_bytes, wrong_keys = tmp_path / "random.pth", tmp_path / "wrong.pth"
    random_bytes.write_bytes(random.Random(3).randbytes(4096))
    torch.save({"features.0.weight": torch.zeros(1)}, wrong_keys)
    cases += [["--lpips-vgg", str(p), "--loss=lpips"] for p in (afile, random_bytes, wrong_keys, tmp_path)]
    start, failures, codes = time.perf_counter(), [], []
    for args in cases:
        case_start = time.perf_counter()
        full = ["--outdir", str(tmp_path / "runs"), "--steps=1", "--batch=2", *args]
        try:
            codes.append(_assert_clean(CliRunner().invoke(train_pid.main, full), args))
        except AssertionError as exc:
            failures.append(str(exc)[:300])
        assert time.perf_counter() - case_start < 30, args
    assert not failures, "\n".join(failures)
    print(f"train_pid.py: {len(cases)} cases ({codes.count(0)} ran, {codes.count(1)} refused) in "
          f"{time.perf_counter() - start:.1f} s")
    assert codes.count(0) > 20 and codes.count(1) > 100
