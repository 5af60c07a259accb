"""The notebooks execute top to bottom (nbclient, a real kernel, small parameters injected after the
papermill-style ``parameters`` cell) and are stored without outputs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["01_quickstart.ipynb", "02_cn_south_li.ipynb", "03_province_scale.ipynb"]
LI_DATA = (ROOT / ".." / "shared" / "data" / "cn-south-li").resolve()


def execute(name: str, params: dict, timeout: int = 300):
    """Run a notebook with ``params`` injected after its parameters cell; returns the executed notebook."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    idx = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    src = "# injected parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(src)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(idx + 1, cell)
    client = nbclient.NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()
    return nb


def text_of(nb) -> str:
    out = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            out.append(o.get("text", "") or str(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


@pytest.mark.parametrize("name", NAMES)
def test_stored_without_outputs_and_parameterised(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{name}: strip outputs before committing"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "OUT =" in tagged[0].source
    assert "plt.show" not in "".join(c.source for c in code)


def test_quickstart_runs(tmp_path):
    t0 = time.perf_counter()
    nb = execute("01_quickstart.ipynb", {"SIZE": 64, "EPOCHS": 1, "STEPS": 2, "OUT": str(tmp_path)})
    text = text_of(nb)
    assert "dashboard: http" in text
    assert (tmp_path / "cube.zarr").is_dir() and (tmp_path / "model.pt").is_file()
    assert "dask.array" in text  # the prospectivity DataArray was shown lazy
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # bands and the map
    assert "'auc'" in text
    print(f"01 executed in {time.perf_counter() - t0:.1f} s")


@pytest.mark.slow  # ~62 s on the 2-core sandbox (two clusters' worth of processes and a kernel)
def test_province_scale_runs_with_local_fallback(tmp_path):
    nb = execute(
        "03_province_scale.ipynb",
        {"SIZE": 64, "CHUNK": 32, "EPOCHS": 1, "STEPS": 2, "LOCAL_GPUS": 0, "OUT": str(tmp_path)},
    )
    text = text_of(nb)
    assert "2 workers, GPU resources: False" in text
    assert "evidence chunks (band, y, x)" in text and "(32, 32)" in text
    import rioxarray  # noqa: F401  (the .rio accessor)
    import xarray as xr

    ds = xr.open_zarr(tmp_path / "prospectivity.zarr", decode_coords="all", consolidated=False)
    assert ds["prospectivity"].shape == (64, 64) and ds.rio.crs is not None
    assert float(ds["prospectivity"].notnull().sum()) > 0


def test_case_study_skips_cleanly_without_data(tmp_path):
    nb = execute("02_cn_south_li.ipynb", {"DATA": str(tmp_path / "absent"), "OUT": str(tmp_path / "out")})
    assert "skipped: the cn-south-li data are not at" in text_of(nb)
    assert not (tmp_path / "out").exists()


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.skipif(not LI_DATA.is_dir(), reason="../shared/data/cn-south-li is absent")
def test_case_study_runs_on_the_real_data(tmp_path):
    nb = execute("02_cn_south_li.ipynb", {"EPOCHS": 1, "STEPS": 2, "OUT": str(tmp_path)}, timeout=600)
    assert "ROC AUC" in text_of(nb)
    assert (tmp_path / "prospectivity.zarr").is_dir()
