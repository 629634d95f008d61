"""Each field of a message says what it accepts in its annotation, and decoding checks it there."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import pytest
import torch

from fedsecure.errors import ProtocolError
from fedsecure.wire import fields as wf
from fedsecure.wire import messages as m
from fedsecure.wire.codec import encode


def test_a_wrong_field_is_named_with_what_it_must_be() -> None:
    with pytest.raises(ProtocolError, match=r"Put\.tags must be strs, got int"):
        m.decode_request(encode([m.Put.KIND, [], 1, torch.zeros(1), False, False, 3, ""]))
    with pytest.raises(ProtocolError, match=r"Get\.object_id must be id, got int"):
        m.decode_request(encode([m.Get.KIND, [], -1]))
    with pytest.raises(ProtocolError, match="Get needs 2 fields, got 3"):
        m.decode_request(encode([m.Get.KIND, [], 1, 2]))


def test_a_field_that_says_nothing_of_what_it_accepts_is_refused_when_its_class_is_read() -> None:
    @dataclass(frozen=True)
    class Unsaid:
        release: wf.Ids
        count: int

    with pytest.raises(TypeError, match=r"Unsaid\.count says nothing of what it accepts"):
        wf.checks(Unsaid)


def positive(v: object, where: str) -> int:
    if type(v) is int and v > 0:
        return v
    raise ProtocolError(f"{where} must be positive")


def test_checks_come_from_the_annotations_in_field_order() -> None:
    @dataclass(frozen=True)
    class Said:
        release: wf.Ids
        count: Annotated[int, positive]

    checks, where = wf.checks(Said)
    assert where == ("Said.release", "Said.count")
    assert wf.build(Said, checks, where, [[1], 2]) == Said([1], 2)
    with pytest.raises(ProtocolError, match="Said.count must be positive"):
        wf.build(Said, checks, where, [[1], 0])
