import pytest

from unimm.data.bad_records import BadRecordError, BadRecords
from unimm.data.loaders import load_jsonl, load_webdataset


@pytest.fixture
def corrupted_jsonl(files):
    """Three good pairs among one planted bad record per kind; line numbers noted per record."""
    files.png("good/0.png", 0)
    files.png("good/1.png", 10)
    files.png("good/2.png", 20)
    files.write("bad/truncated.png", files.png_bytes(30)[:40])
    files.write("bad/empty.png", b"")
    lines = [
        '{"image": "good/0.png", "caption": "zero"}',  # 1
        '{"image": "bad/truncated.png", "caption": "truncated"}',  # 2
        '{"image": "bad/empty.png", "caption": "zero bytes"}',  # 3
        '{"image": "good/1.png", "caption": "one"',  # 4: not JSON
        '{"image": "bad/not_there.png", "caption": "missing image"}',  # 5
        '{"image": "good/1.png", "caption": "   "}',  # 6: empty text
        '{"image": "good/1.png", "caption": 17}',  # 7: wrong type
        '{"image": "good/1.png"}',  # 8: no caption
        "",  # blank lines are not records
        '{"image": "good/1.png", "caption": "one"}',  # 10
        '{"image": "good/2.png", "caption": "two"}',  # 11
    ]
    return files.write("corrupted.jsonl", "\n".join(lines) + "\n")


PLANTED = {
    "unreadable_image": 2,
    "bad_json": 1,
    "missing_image": 1,
    "empty_text": 1,
    "wrong_type": 1,
    "missing_field": 1,
}


@pytest.mark.parametrize("streaming", [False, True])
def test_corrupted_jsonl_counts_match_what_was_planted(corrupted_jsonl, files, streaming):
    bad_records = BadRecords()
    dataset = load_jsonl(corrupted_jsonl, streaming=streaming, bad_records=bad_records)
    captions = [sample["segments"][1]["text"] for sample in dataset]  # a streaming pass counts as it goes
    assert captions == ["zero", "one", "two"]
    assert dict(bad_records.counts) == PLANTED
    assert bad_records.total == 7
    report = bad_records.report()
    assert "7 bad record(s) skipped" in report
    assert f"{corrupted_jsonl}:4: bad_json" in report
    assert f"{corrupted_jsonl}:5: missing_image" in report and "not_there.png" in report


def test_counts_are_the_same_when_loaded_from_the_cache(corrupted_jsonl):
    first, second = BadRecords(), BadRecords()
    load_jsonl(corrupted_jsonl, bad_records=first)
    load_jsonl(corrupted_jsonl, bad_records=second)
    assert second.counts == first.counts == PLANTED


def test_strict_fails_at_the_first_bad_record_with_its_location(corrupted_jsonl):
    with pytest.raises(BadRecordError, match=r"corrupted.jsonl:2: unreadable_image") as raised:
        load_jsonl(corrupted_jsonl, strict=True)
    assert raised.value.reason == "unreadable_image"
    with pytest.raises(BadRecordError, match=r"corrupted.jsonl:2: unreadable_image"):
        list(load_jsonl(corrupted_jsonl, strict=True, streaming=True))


def test_corrupted_tar_shard(files):
    members = [
        ("0.png", files.png_bytes(1)),
        ("0.txt", b"one"),
        ("1.png", files.png_bytes(2)[:30]),  # truncated
        ("1.txt", b"broken image"),
        ("2.txt", b"no image at all"),
        ("3.png", files.png_bytes(3)),  # no caption
        ("4.png", files.png_bytes(4)),
        ("4.json", b"{not json"),
        ("5.png", files.png_bytes(5)),
        ("5.txt", b"five"),
    ]
    bad_records = BadRecords()
    dataset = load_webdataset(files.tar("shard.tar", members), bad_records=bad_records)
    assert [files.pixel_value(s["segments"][0]["image"]) for s in dataset] == [1, 5]
    assert dict(bad_records.counts) == {
        "unreadable_image": 1,
        "missing_image": 1,
        "missing_field": 1,
        "bad_json": 1,
    }


def test_truncated_tar_keeps_the_records_before_the_damage(files):
    path = files.tar(
        "shard.tar", [("0.png", files.png_bytes(1)), ("0.txt", b"one"), ("1.png", files.png_bytes(2))]
    )
    data = path.read_bytes()
    path.write_bytes(data[: 512 * 5 + 100])  # cut inside the third member's data
    bad_records = BadRecords()
    dataset = load_webdataset(path, bad_records=bad_records)
    assert [s["segments"][1]["text"] for s in dataset] == ["one"]
    assert dict(bad_records.counts) == {"unreadable_file": 1}


def test_report_without_bad_records():
    assert BadRecords().report() == "no bad records"


def test_unknown_reason_is_refused():
    with pytest.raises(ValueError, match="unknown bad-record reason"):
        BadRecordError("weird", "detail")
