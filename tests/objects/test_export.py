"""Object polygons: exact to the pixel edges, one per object however many chunks it spans, with
holes, as QuPath GeoJSON and GeoParquet; traced in bounded memory."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from imagefiles import write_tiff, write_zarr
from modelfiles import threshold_model
from outputs import make_output
from skimage.measure import regionprops

from pipeline.cli.main import main
from pipeline.errors import TilesegError
from pipeline.io.readers import open_image
from pipeline.objects.export import export_objects, export_segmentation
from pipeline.objects.instances import label_instances
from pipeline.objects.measure import measure_objects
from pipeline.objects.polygons import mask_polygon, scaled
from pipeline.output.ngff import read_record


def _pixels_inside(geometry: shapely.Geometry, shape: tuple[int, int]) -> np.ndarray:
    """Which pixels' centres the geometry covers (a pixel-edge polygon covers exactly its
    pixels' centres)."""
    y, x = np.mgrid[: shape[0], : shape[1]] + 0.5
    return shapely.contains_xy(geometry, x, y)


@settings(max_examples=60, deadline=None)
@given(mask=arrays(bool, st.tuples(st.integers(1, 12), st.integers(1, 12))))
def test_a_mask_polygon_covers_exactly_its_pixels(mask):
    outline = mask_polygon(mask)
    assert outline.area == mask.sum()
    assert outline.is_valid
    np.testing.assert_array_equal(_pixels_inside(outline, mask.shape), mask)


def test_holes_are_kept_and_rings_oriented_for_geojson():
    ring = np.ones((7, 9), bool)
    ring[2:5, 3:6] = False
    outline = mask_polygon(ring, origin=(10, 20))
    assert outline.geom_type == "Polygon" and len(outline.interiors) == 1
    assert outline.area == ring.sum() == 63 - 9
    assert outline.bounds == (20, 10, 29, 17)  # x: columns 20..28 inclusive, y: rows 10..16
    assert len(outline.exterior.coords) == 5  # no collinear vertices left
    assert outline.exterior.is_ccw and not outline.interiors[0].is_ccw  # RFC 7946
    assert scaled(outline, (2.0, 4.0)).area == outline.area * 8


@pytest.fixture
def output(tmp_path):
    """Objects across chunk borders (16 px chunks), one with a hole, one only corner-connected
    to itself in 8-connectivity (two objects in 4-connectivity), a tiny one."""
    labels = np.zeros((70, 90), np.uint8)
    labels[5:40, 10:50] = 1  # spans 3 x 3 chunks
    labels[15:25, 20:30] = 0  # its hole
    labels[50:52, 60:89] = 1  # a thin bar across two chunk borders
    labels[45, 5] = 1
    labels[60:68, 2:12] = 2  # another class
    out = tmp_path / "out.zarr"
    make_output(out, labels, (16, 16), classes=3, pixel_size=(0.5, 0.25))
    label_instances(out, block_chunks=1)
    measure_objects(out, None, table_path=out / "objects.parquet", block_chunks=1)
    return out


def _instances(out) -> np.ndarray:
    return zarr.open_array(out / "labels" / "instances" / "0", mode="r")[...]


def test_each_object_is_one_polygon_on_its_pixels(output):
    summary = export_objects(
        output, table=output / "objects.parquet", formats=("geojson", "geoparquet")
    )
    ids = _instances(output)
    assert summary.objects == ids.max() == 4
    collection = json.loads((output / "objects.geojson").read_text())
    features = collection["features"]
    assert collection["type"] == "FeatureCollection" and len(features) == 4
    for feature, region in zip(features, regionprops(ids)):
        properties = feature["properties"]
        assert properties["objectType"] == "detection"
        assert properties["measurements"]["id"] == region.label
        geometry = shapely.geometry.shape(feature["geometry"])
        assert geometry.area == region.area == properties["measurements"]["area"]
        np.testing.assert_array_equal(_pixels_inside(geometry, ids.shape), ids == region.label)
    big = shapely.geometry.shape(features[0]["geometry"])
    assert big.geom_type == "Polygon" and len(big.interiors) == 1  # whole, with its hole
    classes = {
        f["properties"]["measurements"]["id"]: f["properties"]["classification"] for f in features
    }
    assert classes[ids[10, 10]] == {"name": "class 1", "color": [255, 64, 64]}
    assert classes[ids[60, 2]] == {"name": "class 2", "color": [64, 200, 64]}


def test_geoparquet_has_the_table_columns_and_geo_metadata(output):
    export_objects(output, table=output / "objects.parquet", formats=("geoparquet",))
    assert not (output / "objects.geojson").exists()
    table = pq.read_table(output / "objects.geoparquet")
    columns = pq.read_table(output / "objects.parquet").column_names
    assert table.column_names == [*columns, "geometry"]
    geo = json.loads(table.schema.metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    column = geo["columns"]["geometry"]
    assert column["encoding"] == "WKB" and column["crs"] is None  # pixels, not the Earth
    assert column["geometry_types"] == ["Polygon"]
    geometries = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(shapely.area(geometries), table.column("area").to_numpy())
    assert column["bbox"] == list(shapely.total_bounds(geometries))
    note = json.loads(table.schema.metadata[b"tileseg"])
    assert note["geometry_pixel_size_um"] == [0.5, 0.25] and note["source"] == "labels/instances"
    assert note["class_names"] == ["background", "class 1", "class 2"]  # the table's note too
    assert table.schema.field("area").metadata[b"unit"] == b"pixel"


def test_geoparquet_opens_in_geopandas(output):
    geopandas = pytest.importorskip("geopandas")  # in no extra: checked where it is installed
    export_objects(output, table=output / "objects.parquet", formats=("geoparquet",))
    frame = geopandas.read_parquet(output / "objects.geoparquet")
    assert len(frame) == 4 and frame.crs is None
    np.testing.assert_array_equal(frame.geometry.area, frame["area"])


def test_a_csv_table_gives_the_geoparquet_its_rows(output, tmp_path):
    """With ``--table csv`` the export's rows are that table's, units and notes included."""
    pixels = np.arange(70 * 90, dtype=np.uint16).reshape(70, 90)
    image = open_image(write_zarr(tmp_path / "image.zarr", pixels, chunks=(32, 32)), axes="YX")
    measure_objects(output, image, table_path=output / "objects.csv", format="csv")
    export_segmentation(output, image, formats=("geoparquet",), table=output / "objects.csv")
    table = pq.read_table(output / "objects.geoparquet")
    header = (output / "objects.csv").read_text().splitlines()[0].split(",")
    assert table.column_names == [*header, "geometry"] and "mean_intensity_c0" in header
    expected = pq.read_table(output / "objects.parquet")  # the fixture's, without intensities
    np.testing.assert_array_equal(table.column("area"), expected.column("area"))
    assert table.schema.field("bbox_x_max").metadata[b"unit"] == b"pixel"
    assert json.loads(table.schema.metadata[b"tileseg"])["labels"] == "labels/instances"
    assert not (output / ".tileseg-export-table.parquet").exists()


def test_polygons_on_level_0_of_a_downsampled_input(output, monkeypatch):
    monkeypatch.setattr(
        "pipeline.objects.export._TASK_OBJECTS", 1
    )  # a task per object, parts joined
    export_objects(
        output, table=output / "objects.parquet", formats=("geojson",), downsample=(4.0, 2.0)
    )
    features = json.loads((output / "objects.geojson").read_text())["features"]
    ids = _instances(output)
    assert [f["properties"]["measurements"]["id"] for f in features] == [1, 2, 3, 4]
    for feature, region in zip(features, regionprops(ids)):
        geometry = shapely.geometry.shape(feature["geometry"])
        assert geometry.area == 8 * region.area
        y0, x0, y1, x1 = region.bbox
        assert geometry.bounds == (2 * x0, 4 * y0, 2 * x1, 4 * y1)


def test_an_output_without_objects_exports_empty_files(tmp_path):
    out = tmp_path / "empty.zarr"
    make_output(out, np.zeros((20, 20), np.uint8), (16, 16))
    label_instances(out)
    measure_objects(out, None, table_path=out / "objects.parquet")
    export_objects(out, table=out / "objects.parquet", formats=("geojson", "geoparquet"))
    assert json.loads((out / "objects.geojson").read_text())["features"] == []
    assert pq.read_table(out / "objects.geoparquet").num_rows == 0


@pytest.mark.slow
def test_thousands_of_objects_export_in_memory_bounded_by_a_task(tmp_path, monkeypatch):
    """2500 objects on a 2048^2 image (16 MiB of uint32 ids): tracing holds a block of chunks
    and one task's objects, never the image."""
    labels = np.zeros((2048, 2048), np.uint8)
    for k, y in enumerate(range(4, 2000, 40)):
        for j, x in enumerate(range(4, 2000, 40)):
            labels[y : y + 6 + (k + j) % 9, x : x + 6 + (k * j) % 7] = 1
    out = tmp_path / "many.zarr"
    make_output(out, labels, (128, 128))
    label_instances(out, block_chunks=8)  # few blocks: quick; the export's blocks are 256^2
    measure_objects(out, None, table_path=out / "objects.parquet")
    image_bytes = 2048 * 2048 * np.dtype(_instances_dtype(out)).itemsize
    monkeypatch.setattr("pipeline.objects.export._TASK_OBJECTS", 1000)
    tracemalloc.start()
    try:
        summary = export_objects(
            out, table=out / "objects.parquet", formats=("geojson", "geoparquet")
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary.objects == 2500
    assert peak < image_bytes / 8, f"peak {peak} B for a {image_bytes} B image"
    table = pq.read_table(out / "objects.geoparquet", columns=["area", "geometry"])
    areas = shapely.area(shapely.from_wkb(table.column("geometry").to_numpy(False)))
    np.testing.assert_array_equal(areas, table.column("area").to_numpy())


def _instances_dtype(out) -> str:
    return zarr.open_array(out / "labels" / "instances" / "0", mode="r").dtype.str


def test_segment_exports_on_the_input_level_0(tmp_path, capsys):
    """``--level 1`` segments the half-size level; polygons lie on level 0 of the slide."""
    rng = np.random.default_rng(0)
    image = np.zeros((256, 192), np.uint8)
    for y, x in rng.integers(8, 180, (25, 2)):
        image[y : y + 12, x : x + 10] = 200
    slide = write_tiff(tmp_path / "s.tif", image, axes="YX", tile=(32, 32), pyramid_levels=1)
    model = threshold_model(tmp_path / "m.safetensors", level=0.5)
    out = tmp_path / "out.zarr"
    args = ["segment", str(slide), str(out), "--model", model, "--tile", "64", "--chunk", "32"]
    flags = ["--level", "1", "--instances", "connected", "--no-progress", "--normalize", "none"]
    exports = ["--export", "geojson", "--export", "geoparquet"]
    assert main([*args, *flags, *exports]) == 0
    record = read_record(out)
    assert record["export"]["files"] == {
        "geojson": "objects.geojson",
        "geoparquet": "objects.geoparquet",
    }
    assert record["export"]["downsample"] == [2.0, 2.0]
    assert "output" not in record["instances"]  # no absolute paths that go stale on a move
    assert not (out / "objects.parquet").exists()  # no table asked: its scratch is gone
    features = json.loads((out / "objects.geojson").read_text())["features"]
    ids = zarr.open_array(out / "labels" / "instances" / "0", mode="r")[...]
    assert len(features) == ids.max() == record["instances"]["objects"] > 0
    union = shapely.union_all([shapely.geometry.shape(f["geometry"]) for f in features])
    assert union.area == 4 * np.count_nonzero(ids)
    np.testing.assert_array_equal(_pixels_inside(union, image.shape)[::2, ::2], ids > 0)

    capsys.readouterr()
    assert main(["segment", str(slide), str(tmp_path / "x.zarr"), "--export", "geojson"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tileseg: error: --export: export: object polygons need --instances"]


def test_a_3d_output_is_refused(tmp_path):
    out = tmp_path / "v.zarr"
    make_output(out, np.ones((4, 8, 8), np.uint8), (4, 8, 8))
    with pytest.raises(TilesegError, match="need a 2D image"):
        export_objects(out, table=out / "none.parquet", formats=("geojson",))


def test_export_option_is_a_list_of_formats_in_the_fingerprint():
    from pipeline.config import SegmentOptions, options_from_mapping
    from pipeline.output.provenance import result_options

    options = options_from_mapping(
        {"export": ["geoparquet", "geojson", "geojson"], "instances": "connected"}
    )
    assert options.export == ("geojson", "geoparquet")
    with pytest.raises(TilesegError, match="must be among geojson, geoparquet, got 'shp'"):
        options_from_mapping({"export": ["shp"], "instances": "connected"})
    assert result_options(SegmentOptions())["export"] == []
    assert result_options(options)["export"] == ["geojson", "geoparquet"]
