"""Per-object tables: objects cut by block borders are measured as on the whole image."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from imagefiles import write_zarr
from outputs import make_output
from skimage.measure import regionprops

from pipeline.errors import TilesegError
from pipeline.io.readers import open_image
from pipeline.objects.instances import label_instances
from pipeline.objects.measure import measure_objects
from pipeline.synthetic.render import SyntheticConfig, synthetic_pair


def instances(out) -> np.ndarray:
    return zarr.open_array(out / "labels" / "instances" / "0", mode="r")[...]


def check_against_regionprops(table: dict, labels: np.ndarray, image: np.ndarray | None) -> None:
    props = regionprops(labels, intensity_image=image)
    axes = "zyx"[3 - labels.ndim :]
    assert list(table["id"]) == [p.label for p in props]
    for i, p in enumerate(props):
        assert table["area"][i] == p.area
        centroid = [table[f"centroid_{a}"][i] for a in axes]
        np.testing.assert_allclose(centroid, p.centroid, rtol=0, atol=1e-9)
        bbox = [table[f"bbox_{a}_min"][i] for a in axes] + [table[f"bbox_{a}_max"][i] for a in axes]
        assert tuple(bbox) == p.bbox
        if image is not None:
            means = np.atleast_1d(p.intensity_mean)
            got = [table[f"mean_intensity_c{c}"][i] for c in range(len(means))]
            np.testing.assert_allclose(got, means, rtol=1e-12)


@pytest.fixture
def slide(tmp_path):
    """A fluorescence image, its output with two classes (left/right) and instances."""
    config = SyntheticConfig(tissue=False, noise=True, density=8)
    image, truth = synthetic_pair((90, 110), config=config)
    classes = (truth > 0).astype(np.uint8)
    classes[:, 60:] *= 2
    out = tmp_path / "out.zarr"
    make_output(out, classes, (16, 16), classes=3, pixel_size=(0.5, 0.25))
    label_instances(out, block_chunks=1)
    path = write_zarr(tmp_path / "image.zarr", image, chunks=(32, 32))
    return out, open_image(path, axes="YX"), image, classes


def test_table_matches_regionprops_on_the_whole_image(tmp_path, slide):
    out, image, pixels, classes = slide
    summary = measure_objects(out, image, table_path=tmp_path / "objects.parquet", block_chunks=1)
    table = pq.read_table(tmp_path / "objects.parquet").to_pydict()
    labels = instances(out)
    check_against_regionprops(table, labels, pixels)
    # physical units from the output's pixel size
    np.testing.assert_allclose(table["area_um2"], np.array(table["area"]) * 0.125)
    np.testing.assert_allclose(table["centroid_x_um"], np.array(table["centroid_x"]) * 0.25)
    # majority class, also for objects crossing the class border at x = 60
    for i, p in enumerate(regionprops(labels)):
        values, counts = np.unique(classes[tuple(p.coords.T)], return_counts=True)
        assert table["class"][i] == values[counts.argmax()]
    assert summary.objects == labels.max() == len(table["id"])
    assert summary.per_class == {c: table["class"].count(c) for c in sorted(set(table["class"]))}
    assert summary.foreground_area == np.count_nonzero(labels)
    assert summary.foreground_area_um2 == pytest.approx(np.count_nonzero(labels) * 0.125)
    assert summary.foreground_volume_um3 is None
    attrs = zarr.open_group(out / "labels" / "instances", mode="r").attrs
    assert attrs["tileseg-measurements"]["objects"] == summary.objects


def test_parquet_says_its_units_and_boxes_are_in_micrometres(tmp_path, slide):
    """bbox in µm are the pixels' edges in the output's NGFF space (pixel i centred at i * p);
    every column has a unit; the record holds the table's path relative to the output."""
    out, image, _, _ = slide
    summary = measure_objects(out, image, table_path=out / "objects.parquet", block_chunks=1)
    table = pq.read_table(out / "objects.parquet")
    data = table.to_pydict()
    for axis, p in (("y", 0.5), ("x", 0.25)):
        lo, hi = np.array(data[f"bbox_{axis}_min"]), np.array(data[f"bbox_{axis}_max"])
        np.testing.assert_allclose(data[f"bbox_{axis}_min_um"], (lo - 0.5) * p)
        np.testing.assert_allclose(data[f"bbox_{axis}_max_um"], (hi - 0.5) * p)
        centre = np.array(data[f"centroid_{axis}_um"])
        assert (
            (centre > data[f"bbox_{axis}_min_um"]) & (centre < data[f"bbox_{axis}_max_um"])
        ).all()
    units = {f.name: (f.metadata or {}).get(b"unit", b"?").decode() for f in table.schema}
    assert units["area"] == "pixel" and units["area_um2"] == "micrometer^2"
    assert (
        units["bbox_y_max_um"] == "micrometer" and units["mean_intensity_c0"] == "input intensity"
    )
    assert b"half-open" in table.schema.field("bbox_x_max").metadata[b"description"]
    assert "?" not in units.values()  # every column explained
    note = json.loads(table.schema.metadata[b"tileseg"])
    assert note["labels"] == "labels/instances" and note["pixel_size_um"] == [0.5, 0.25]
    assert note["class_names"] == ["background", "class 1", "class 2"]
    record = summary.to_dict()
    assert record["table"] == "objects.parquet" and "output" not in record
    assert "foreground_area_um" not in record and record["foreground_area_um2"] > 0


def test_csv_many_buckets_and_no_image(tmp_path, slide, monkeypatch):
    out, _, _, _ = slide
    monkeypatch.setattr(
        "pipeline.objects.measure._BUCKET_OBJECTS", 7
    )  # several reduce tasks and parts
    summary = measure_objects(out, None, table_path=tmp_path / "t.csv", format="csv", workers=2)
    with open(tmp_path / "t.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    table = {k: [float(r[k]) for r in rows] for k in rows[0]}
    check_against_regionprops(table, instances(out), None)
    assert summary.objects == len(rows) and "mean_intensity_c0" not in rows[0]


def test_3d_multichannel_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    classes = np.zeros((6, 20, 24), np.uint8)
    classes[1:4, 3:15, 5:18] = 1  # a box across chunk corners in z, y and x
    classes[0, 0, 0] = classes[5, 19, 20:] = 1  # single voxel and a rod at image borders
    out = tmp_path / "out.zarr"
    make_output(out, classes, (4, 8, 8))
    label_instances(out)
    channels = rng.integers(0, 1000, (2, 6, 20, 24)).astype(np.uint16)
    path = write_zarr(tmp_path / "vol.zarr", channels, chunks=(1, 3, 8, 8))
    image = open_image(path, axes="CZYX")
    summary = measure_objects(out, image, table_path=tmp_path / "t.parquet", pixel_size=(2, 1, 1))
    table = pq.read_table(tmp_path / "t.parquet").to_pydict()
    labels = instances(out)
    check_against_regionprops(table, labels, np.moveaxis(channels, 0, -1))
    assert summary.objects == 3 and "volume_um3" in table
    other = write_zarr(tmp_path / "small.zarr", channels[:, :, :10], chunks=(1, 3, 8, 8))
    with pytest.raises(TilesegError, match="differs"):
        measure_objects(out, open_image(other, axes="CZYX"), table_path=tmp_path / "x.parquet")
    with pytest.raises(TilesegError, match="no instance labels"):
        measure_objects(out, None, table_path=tmp_path / "x.parquet", name="cells")
