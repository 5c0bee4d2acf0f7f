"""dicom_node.text: every string from a model made valid for its VR, checked over whole ranges."""

from __future__ import annotations

import re

import pytest

from dicom_node.text import MAX_BYTES, TEXT_VRS, clean, clean_language, raw, to_str, truncate_bytes

ALL_VRS = sorted(MAX_BYTES)
SINGLE_LINE_VRS = sorted(set(MAX_BYTES) - TEXT_VRS)
#: Every control character: C0, DEL, C1.
CONTROLS = [chr(c) for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]]
#: What LT/ST/UT may hold (ESC: ISO_IR 192 has no code extensions; TAB: dciodvfy refuses it).
TEXT_CONTROLS = {"\n", "\f", "\r"}
#: Characters of the Basic G0 set a CS value may hold.
CS_CHARS = re.compile(r"[A-Z0-9 _]*")


class TestClean:
    @pytest.mark.parametrize("vr", ALL_VRS)
    def test_every_control_character_is_removed_or_allowed(self, vr: str) -> None:
        for ch in CONTROLS:
            out = clean(f"a{ch}b", vr)
            allowed = vr in TEXT_VRS and ch in TEXT_CONTROLS
            assert out == (f"a{ch}b" if allowed else "a b" if vr != "CS" else "A B"), (vr, hex(ord(ch)))

    @pytest.mark.parametrize("vr", ALL_VRS)
    def test_no_control_character_survives_a_whole_range(self, vr: str) -> None:
        text = "".join(chr(c) for c in range(0x00, 0x250))
        out = clean(text, vr)
        survivors = {ch for ch in out if ch in CONTROLS}
        assert survivors <= (TEXT_CONTROLS if vr in TEXT_VRS else set()), (vr, survivors)

    @pytest.mark.parametrize("vr", ["SH", "LO", "CS", "PN", "ST", "LT"])
    @pytest.mark.parametrize("char", ["a", "é", "肺", "😀"])  # 1, 2, 3 and 4 UTF-8 bytes
    def test_length_is_bounded_in_utf8_bytes_without_splitting_a_character(self, vr: str, char: str) -> None:
        limit = MAX_BYTES[vr]
        width = len(char.encode())
        out = clean(char * (limit + 5), vr)
        if vr == "CS" and char != "a":
            return  # not in the CS repertoire: replaced, length checked with "a"
        assert len(out.encode()) <= limit
        assert len(out.encode()) > limit - width  # as much as fits is kept
        assert set(out) <= {char.upper() if vr == "CS" else char}

    def test_an_extra_byte_bound_applies_below_the_vr_limit(self) -> None:
        assert clean("x" * 5000, "UT", max_bytes=100) == "x" * 100

    def test_ut_keeps_long_text(self) -> None:
        text = "Findings: " + "no acute abnormality. " * 5000
        assert clean(text, "UT") == text.rstrip(" ")

    @pytest.mark.parametrize("vr", SINGLE_LINE_VRS)
    def test_backslash_never_splits_a_value(self, vr: str) -> None:
        assert "\\" not in clean("left\\right", vr)

    @pytest.mark.parametrize("vr", sorted(TEXT_VRS))
    def test_text_vrs_keep_backslash(self, vr: str) -> None:
        assert clean("C:\\path", vr) == "C:\\path"

    @pytest.mark.parametrize("vr", ALL_VRS)
    def test_lone_surrogates_become_replacement_characters(self, vr: str) -> None:
        broken = b"lung \xff\xfe nodule".decode("utf-8", "surrogateescape")
        out = clean(broken, vr)
        out.encode("utf-8")  # would raise on a surrogate
        assert "\ufffd" in out or vr == "CS"

    def test_bytes_are_decoded_as_utf8_with_replacement(self) -> None:
        assert clean(b"\xe8\x82\xba \xc3", "LO") == "肺 \ufffd"

    def test_chinese_text_is_kept(self) -> None:
        assert clean("右侧少量胸腔积液。\n结论：胸腔积液。", "UT") == "右侧少量胸腔积液。\n结论：胸腔积液。"

    def test_cs_is_upper_case_defined_characters(self) -> None:
        out = clean("ai-draft v1.0", "CS")
        assert out == "AI_DRAFT V1_0"
        assert CS_CHARS.fullmatch(out)

    def test_pn_keeps_its_structure_within_limits(self) -> None:
        assert clean("Doe^John^^^^Extra=山田^太郎=やまだ=x", "PN") == "Doe^John^^^ Extra=山田^太郎=やまだ"
        long = clean("A" * 100 + "^B", "PN")
        assert len(long.encode()) <= 64

    def test_leading_and_trailing_spaces_are_dropped(self) -> None:
        assert clean("  lung  ", "LO") == "lung"
        assert clean("  two lines \n", "UT") == "  two lines \n"

    def test_unknown_vr_is_an_error(self) -> None:
        with pytest.raises(ValueError, match="No text rule for VR 'DA'"):
            clean("20240101", "DA")


class TestRaw:
    def test_disallowed_controls_are_shown_as_control_pictures(self) -> None:
        for code in [*range(0x20), 0x7F]:
            ch = chr(code)
            out = raw(f"a{ch}b")
            if ch in TEXT_CONTROLS:
                assert out == f"a{ch}b"
            else:
                assert out == f"a{chr(0x2400 + code) if code < 0x20 else chr(0x2421)}b", hex(code)

    def test_c1_controls_and_surrogates_become_replacement_characters(self) -> None:
        assert raw("a\x85b\udcffc") == "a\ufffdb\ufffdc"

    def test_the_reported_record_separator(self) -> None:
        assert raw("Yes\x1eNo") == "Yes\u241eNo"

    def test_raw_needs_a_text_vr(self) -> None:
        with pytest.raises(ValueError, match="text VR"):
            raw("x", "LO")


def test_truncate_never_splits_a_character() -> None:
    assert truncate_bytes("肺肺", 5) == "肺"
    assert truncate_bytes("肺肺", 6) == "肺肺"


def test_to_str_only_replaces_what_utf8_cannot_encode() -> None:
    assert to_str("a\udc80b€") == "a\ufffdb€"


@pytest.mark.parametrize(
    ("tag", "expected"),
    [("zh-Hans", "zh-Hans"), ("en\x1e", "en"), ("", "en"), ("x" * 40, "x" * 16), ("-", "en")],
)
def test_language_tags(tag: str, expected: str) -> None:
    assert clean_language(tag) == expected
