"""Data-free moment matching (`train_mm.py --data=teacher`): the teacher's own samples, generated once into the run
directories, split across processes, shared by runs, resumed when a generation is killed, and an exact resume of
training."""

import os

import numpy as np
import pytest
import torch

from pid.data import TEACHER_DATA_SEED0, TeacherDataSource, open_dataset
from pid.exact_eval import heun_endpoints
from pid.images import to_uint8
from pid.metrics.evaluate import seed_inputs
from pid.teachers import load_teacher
from tests.test_mm import _assert_same_states, _final_state, _run_mm


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("builtin:glyphs16")


def _prepare(tmp_path, run, teacher, **kwargs):
    """A TeacherDataSource prepared for the run directory `tmp_path/run` (its `.path` is the cache's zip)."""
    os.makedirs(tmp_path / run, exist_ok=True)
    source = TeacherDataSource(teacher, teacher_spec="builtin:glyphs16", **kwargs)
    source.prepare(str(tmp_path / run))
    return source


def _images(path):
    data = open_dataset(path)
    return np.stack([data[i].numpy() for i in range(len(data))]), data.labels


def test_prepare_writes_the_teachers_heun_samples_of_its_seeds(tmp_path, teacher):
    source = _prepare(tmp_path, "00000-run", teacher, num=300, steps=5, seed=0)
    assert os.path.dirname(os.path.dirname(os.path.dirname(source.path))) == str(tmp_path)   # beside the runs
    images, labels = _images(source.path)
    assert images.shape == (300, 3, 16, 16) and labels.shape == (300,)
    seeds = [TEACHER_DATA_SEED0 + i for i in (0, 1, 257, 299)]   # both parts
    z, c = seed_inputs(seeds, [3, 16, 16], teacher.label_dim, torch.device("cpu"))
    want = to_uint8(heun_endpoints(teacher, z, c, 5).float()).permute(0, 3, 1, 2).numpy()
    assert np.array_equal(images[[0, 1, 257, 299]], want)
    assert np.array_equal(labels[[0, 1, 257, 299]], c.argmax(1).numpy())
    assert not os.path.exists(os.path.join(os.path.dirname(source.path), "parts"))
    import json
    info = json.load(open(tmp_path / "00000-run" / "teacher-data.json"))
    assert info["path"] == source.path and info["manifest"]["num"] == 300 and info["generation_seconds"] > 0
    x, lab = source.sample(0, 8, None, torch.device("cpu"))
    assert x.shape == (8, 3, 16, 16) and lab.shape == (8, teacher.label_dim) and x.min() >= -1 and x.max() <= 1


def test_a_prepared_cache_is_shared_by_runs_and_a_different_one_generated(tmp_path, teacher, monkeypatch):
    first = _prepare(tmp_path, "00000-a", teacher, num=40, steps=3, seed=0)
    calls = []
    import pid.exact_eval
    real = pid.exact_eval.heun_endpoints
    monkeypatch.setattr(pid.exact_eval, "heun_endpoints", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = _prepare(tmp_path, "00001-b", teacher, num=40, steps=3, seed=5)   # another run and data order
    assert calls == [] and again.path == first.path
    other = _prepare(tmp_path, "00002-c", teacher, num=40, steps=4, seed=0)   # other steps: other samples
    assert calls == [1] and other.path != first.path


def test_a_killed_generation_resumes_from_its_finished_parts(tmp_path, teacher, monkeypatch):
    import pid.exact_eval
    real, calls = pid.exact_eval.heun_endpoints, []

    def dies_on_the_second_part(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt   # as a SIGINT in the middle of the generation
        return real(*args, **kwargs)

    monkeypatch.setattr(pid.exact_eval, "heun_endpoints", dies_on_the_second_part)
    with pytest.raises(KeyboardInterrupt):
        _prepare(tmp_path / "killed", "00000-run", teacher, num=600, steps=3, seed=0)
    (key,) = os.listdir(tmp_path / "killed" / "teacher-data")
    cache = tmp_path / "killed" / "teacher-data" / key
    assert sorted(os.listdir(cache / "parts")) == ["part-000000.npz"] and not os.path.exists(cache / "teacher-data.zip")
    calls.clear()
    monkeypatch.setattr(pid.exact_eval, "heun_endpoints", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = _prepare(tmp_path / "killed", "00001-run", teacher, num=600, steps=3, seed=0)   # the next run
    assert len(calls) == 2                      # parts 1 and 2 only
    fresh = _prepare(tmp_path / "fresh", "00000-run", teacher, num=600, steps=3, seed=0)
    a, b = _images(resumed.path), _images(fresh.path)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def _zip_of(outdir):
    import json
    (run,) = [d for d in os.listdir(outdir) if d != "teacher-data"]
    return json.load(open(os.path.join(outdir, run, "teacher-data.json")))["path"]


def test_two_processes_split_the_generation_and_train_as_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ("--data=teacher", "--teacher-data-num=600", "--teacher-data-steps=3")
    res = _run_mm(one, 2, *extra, "--batch-gpu=4")
    assert res.returncode == 0, res.stderr[-2000:]
    res = _run_mm(two, 2, *extra, nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _images(_zip_of(one)), _images(_zip_of(two))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    sa, sb = _final_state(one), _final_state(two)
    for name in ("generator", "aux"):
        for key, value in sa["networks"][name].items():
            torch.testing.assert_close(value, sb["networks"][name][key], rtol=1e-5, atol=1e-6, msg=(name, key))


def test_resume_with_teacher_data_is_bit_identical(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    extra = ("--data=teacher", "--teacher-data-num=50", "--teacher-data-steps=3")
    assert _run_mm(full, 6, *extra).returncode == 0
    assert _run_mm(part, 4, *extra).returncode == 0
    stamp = os.path.getmtime(_zip_of(part))
    res = _run_mm(part, 6, *extra, "--resume=auto")
    assert res.returncode == 0, res.stderr[-2000:]
    assert os.path.getmtime(_zip_of(part)) == stamp          # found, not generated again
    a, b = _final_state(full), _final_state(part)
    assert a["step"] == b["step"] == 6
    _assert_same_states(a, b)


@pytest.mark.parametrize("args, words", [
    (("--data=teacher,other.zip",), "mixes the teacher's own samples with a dataset"),
    (("--teacher-data-num=100",), "applies to --data=teacher only"),
    (("--data=some.zip", "--teacher-data-steps=9"), "applies to --data=teacher only"),
])
def test_mixing_teacher_data_with_a_path_is_one_error_line(tmp_path, args, words):
    res = _run_mm(tmp_path / "runs", 1, *args)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert res.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error:") and words in lines[0], res.stderr
    assert not os.path.exists(tmp_path / "runs")
