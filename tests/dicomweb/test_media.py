"""Accept parsing and negotiation, multipart encoding, bulk data URIs (pure)."""

from __future__ import annotations

import numpy as np
import pytest

from dicomweb.media import (
    FrameChoice,
    InstanceChoice,
    choose_frames,
    choose_instance,
    choose_metadata,
    choose_rendered,
    fill_bulk_data_uris,
    header_with_bulk_data_uris,
    parse_accept,
)
from dicomweb.multipart import Part, content_type, decode_parts, encode_parts
from dicomweb.rendering import Window, apply_window, parse_frame_list, parse_viewport
from vannah_pipelines.dicom.transcoding import EXPLICIT_LE, transcode_reason

JPEG = "1.2.840.10008.1.2.4.50"
RLE = "1.2.840.10008.1.2.5"
J2K = "1.2.840.10008.1.2.4.90"


@pytest.mark.parametrize(
    "header",
    [
        'multipart/related; type="application/dicom"; transfer-syntax=*',
        "multipart/related; type=application/dicom; transfer-syntax=*",
        'multipart/related;type="application/dicom";transfer-syntax="*"',
        'Multipart/Related; Type="Application/DICOM"; transfer-syntax=*',
    ],
)
def test_parse_accept_reads_quoted_and_unquoted_params(header: str) -> None:
    (media_range,) = parse_accept(header)
    assert media_range.multipart
    assert media_range.part_type == "application/dicom"
    assert media_range.transfer_syntax == "*"


def test_parse_accept_orders_by_q_and_keeps_commas_in_quotes() -> None:
    ranges = parse_accept(
        'image/png;q=0.5, multipart/related; type="application/dicom", image/gif;q=0, */*;q=0.1'
    )
    assert [r.media_type for r in ranges] == ["multipart/related", "image/png", "*/*"]


def test_parse_accept_without_header_is_anything() -> None:
    assert parse_accept(None)[0].media_type == "*/*"


def test_choose_instance_defaults_to_explicit_le_and_star_keeps_stored() -> None:
    default = choose_instance(
        parse_accept('multipart/related; type="application/dicom"'), JPEG, single_part_ok=False
    )
    assert default == InstanceChoice(True, EXPLICIT_LE)
    stored = choose_instance(
        parse_accept("multipart/related; type=application/dicom; transfer-syntax=*"),
        JPEG,
        single_part_ok=False,
    )
    assert stored == InstanceChoice(True, JPEG)


def test_choose_instance_refuses_lossy_encoding_with_reason() -> None:
    reason = choose_instance(
        parse_accept(f"multipart/related; type=application/dicom; transfer-syntax={JPEG}"),
        EXPLICIT_LE,
        single_part_ok=False,
    )
    assert isinstance(reason, str)
    assert JPEG in reason


def test_choose_instance_picks_first_acceptable_of_several() -> None:
    accept = (
        f"multipart/related; type=application/dicom; transfer-syntax={JPEG}, "
        f"multipart/related; type=application/dicom; transfer-syntax={RLE};q=0.9"
    )
    assert choose_instance(parse_accept(accept), EXPLICIT_LE, single_part_ok=False) == (
        InstanceChoice(True, RLE)
    )


def test_transcode_reason_allows_decoding_and_lossless_encoding() -> None:
    assert transcode_reason(JPEG, EXPLICIT_LE) is None
    assert transcode_reason(EXPLICIT_LE, RLE) is None
    assert transcode_reason(EXPLICIT_LE, JPEG) is not None


@pytest.mark.parametrize(
    "header",
    [
        "multipart/related; type=application/octet-stream; transfer-syntax=*",
        'multipart/related; type="application/octet-stream"; transfer-syntax="*"',
    ],
)
def test_choose_frames_star_returns_frames_as_stored(header: str) -> None:
    choice = choose_frames(parse_accept(header), JPEG, 1)
    assert choice == FrameChoice("application/octet-stream", JPEG, decode=False)
    assert choice.part_content_type == f"application/octet-stream; transfer-syntax={JPEG}"


def test_choose_frames_defaults_to_decoded_octet_stream() -> None:
    choice = choose_frames(
        parse_accept("multipart/related; type=application/octet-stream"), JPEG, 2
    )
    assert choice == FrameChoice("application/octet-stream", EXPLICIT_LE, decode=True)


def test_choose_frames_compressed_media_type_only_if_stored_so() -> None:
    jpeg = parse_accept('multipart/related; type="image/jpeg"')
    assert choose_frames(jpeg, JPEG, 1) == FrameChoice("image/jpeg", JPEG, decode=False)
    assert isinstance(choose_frames(jpeg, J2K, 1), str)
    assert choose_frames(parse_accept("multipart/related; type=image/jp2"), J2K, 1) == (
        FrameChoice("image/jp2", J2K, decode=False)
    )


def test_choose_metadata_and_rendered() -> None:
    assert choose_metadata(parse_accept("application/dicom+json")) == "application/dicom+json"
    assert choose_metadata(parse_accept(None)) == "application/dicom+json"
    assert choose_metadata(parse_accept('multipart/related; type="application/dicom+xml"')) is None
    assert choose_rendered(parse_accept("image/png, image/jpeg")) == "image/png"
    assert choose_rendered(parse_accept("*/*")) == "image/jpeg"
    assert choose_rendered(parse_accept("application/dicom")) is None


def test_multipart_round_trip_streams_parts_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    import dicomweb.multipart

    monkeypatch.setattr(dicomweb.multipart, "COALESCE_SIZE", 16)
    parts = [
        Part("application/dicom", iter([b"abc", b"", b"def"])),
        Part("application/dicom", iter([b"\r\n--not-the-boundary\r\n"])),
    ]
    chunks = list(encode_parts(parts, "B0UND"))
    assert len(chunks) > 3  # streamed in blocks, never the whole body at once
    assert max(len(c) for c in chunks) < 16 + 64
    decoded = decode_parts(b"".join(chunks), content_type("application/dicom", "B0UND"))
    assert [c for _, c in decoded] == [b"abcdef", b"\r\n--not-the-boundary\r\n"]
    assert decoded[0][0]["content-type"] == "application/dicom"


def test_fill_bulk_data_uris_points_at_bulk_route_including_sequences() -> None:
    header = {
        "7FE00010": {"vr": "OW", "BulkDataURI": ""},
        "00081140": {"vr": "SQ", "Value": [{"00091001": {"vr": "OB", "BulkDataURI": ""}}]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "X"}]},
    }
    filled = fill_bulk_data_uris(header, "/dicom-web/studies/1/series/2/instances/3")
    pixel = filled["7FE00010"]["BulkDataURI"]
    assert pixel == "/dicom-web/studies/1/series/2/instances/3/bulk/7FE00010"
    item = filled["00081140"]["Value"][0]["00091001"]
    assert item["BulkDataURI"].endswith("/bulk/00081140/0/00091001")


def test_header_text_with_bulk_data_uris_equals_the_parsed_fill() -> None:
    """The metadata route's unparsed path gives what parsing and filling gives, over the
    header JSON ingest writes for pydicom's test files (pixel data, sequences, overlays)."""
    import json

    from tests.catalog.conftest import pydicom_test_files
    from vannah_pipelines.dicom.headers import read_header

    url = "/dicom-web/studies/1.2/series/3.4/instances/5.6"
    kinds = {"none": 0, "top-level": 0, "parsed": 0}
    for path in pydicom_test_files():
        try:
            text = read_header(path).header_json
        except Exception:  # the files ingest quarantines have no header to serve
            continue
        fast = header_with_bulk_data_uris(text, url)
        assert json.loads(fast) == fill_bulk_data_uris(json.loads(text), url), path.name
        kind = "none" if fast is text else ("parsed" if '"SQ"' in text else "top-level")
        kinds[kind] += 1
    assert all(kinds.values()), kinds  # every path was taken


def test_parse_frame_list_and_viewport_reject_bad_values() -> None:
    assert parse_frame_list("2,1") == [2, 1]
    for bad in ("0", "1,,2", "a", "-1"):
        with pytest.raises(ValueError):
            parse_frame_list(bad)
    assert parse_viewport("64,32") == (64, 32)
    with pytest.raises(ValueError):
        parse_viewport("0,10")


def test_apply_window_linear_maps_window_to_full_range() -> None:
    values = np.array([0.0, 40.0, 80.0, 1000.0])
    out = apply_window(values, Window(40, 80))
    assert out[0] == 0 and out[-1] == 255 and 120 < out[1] < 135
