"""PySyft 0.2's inspection API: tags and descriptions, search, ``_objects``, ``clear_objects``,
the local worker, and how workers and pointers show themselves in a notebook."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from torch import nn

import fedsecure as sy
from fedsecure.wire import messages as m
from fedsecure.wire.codec import encode
from fedsecure.worker.core import WorkerCore
from fedsecure.worker.store import Sender

SECRET = torch.tensor([[123.456, 654.321], [111.222, 333.444]])


def _without_ids(page: str) -> str:
    """``page`` without its objects' random hex ids, which may hold the secret's digits by chance."""
    return re.sub(r"0x[0-9a-f]+", "", page)


# -- tags and descriptions ---------------------------------------------------------------------


def test_tag_and_describe_return_the_tensor_and_show_on_it() -> None:
    t = torch.ones(2)
    assert t.tags == set() and t.description is None
    assert t.tag("#a", "b") is t and t.describe("some words") is t
    assert t.tags == {"#a", "#b"} and t.description == "some words"
    t.tag("#a", "#c")
    assert t.tags == {"#a", "#b", "#c"}, "tagging again adds, once per tag"


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda t: t.tag(3), TypeError),
        (lambda t: t.tag("#"), ValueError),
        (lambda t: t.tag("#" + "x" * 256), ValueError),
        (lambda t: t.describe(None), TypeError),
        (lambda t: t.describe("x" * (m.MAX_TEXT + 1)), ValueError),
    ],
    ids=["not-a-string", "empty", "too-long", "description-not-a-string", "description-too-long"],
)
def test_bad_tags_and_descriptions_are_refused_with_a_fix(call: Callable[[torch.Tensor], object], error: type) -> None:
    t = torch.ones(2)
    with pytest.raises(error, match="tag|description"):
        call(t)
    assert t.tags == set() and t.description is None


def test_tags_and_description_survive_send_and_search(bob: sy.VirtualWorker) -> None:
    x = torch.arange(4.0).tag("#boston", "#housing").describe("inputs of the housing data")
    ptr = x.send(bob)
    assert ptr.tags == {"#boston", "#housing"} and ptr.description == "inputs of the housing data"
    (found,) = bob.search("#boston")
    assert found.tags == {"#boston", "#housing"} and found.description == "inputs of the housing data"
    assert torch.equal(found.get(), x), "the model owner's own data reads back"
    plain = torch.ones(1).send(bob)
    assert plain.tags == set() and plain.description is None


def test_send_tags_join_the_tensors_own(bob: sy.VirtualWorker) -> None:
    ptr = torch.ones(3).tag("#a").send(bob, tags=["b"])
    assert ptr.tags == {"#a", "#b"}
    assert len(bob.search(["#a", "#b"])) == 1


def test_tagging_a_pointer_labels_it_here_only(bob: sy.VirtualWorker) -> None:
    ptr = torch.ones(2).tag("#sent").send(bob)
    assert ptr.tag("#later") is ptr and ptr.describe("noted here") is ptr
    assert ptr.tags == {"#sent", "#later"} and ptr.description == "noted here"
    assert bob.search("#later") == [], "the worker keeps the tags the tensor was sent with"
    assert len(bob.search("#sent")) == 1


# -- search --------------------------------------------------------------------------------------


def test_a_list_query_matches_every_item_by_tag_or_description(bob: sy.VirtualWorker) -> None:
    kept = [  # pointers kept: the objects stay
        torch.full((2,), float(i)).tag(*tags).describe(text).send(bob)
        for i, (tags, text) in enumerate([
            (("#fun", "#boston", "#housing"), "The input datapoints of the housing data."),
            (("#fun", "#boston"), "The targets of the housing data."),
            (("#fun", "#mnist"), "The images of the digits data."),
        ])
    ]
    values = lambda query: sorted(float(p.get()[0]) for p in bob.search(query))  # noqa: E731
    assert values(["#boston", "#housing"]) == [0.0]
    assert values("#fun") == [0.0, 1.0, 2.0]
    assert values(["#fun", "housing data"]) == [0.0, 1.0], "words of the description match"
    assert values(["#boston", "images"]) == []
    assert values(["boston"]) == [0.0, 1.0], "'boston' and '#boston' are the same tag"
    assert values(("#mnist",)) == [2.0]
    assert len(kept) == 3


def test_bad_queries_say_what_a_query_is(bob: sy.VirtualWorker) -> None:
    for query in ([], [3], "", None, ["#a", ""]):
        with pytest.raises(TypeError, match="tag"):
            bob.search(query)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at most"):
        bob.search(["#a"] * (m.MAX_TERMS + 2))


def test_search_finds_the_workers_data_and_the_callers_own_only(federation: sy.Federation) -> None:
    bob = sy.VirtualWorker(id="bob", federation=federation, data={"data": SECRET})
    mine = torch.ones(2).tag("#data").send(bob)
    mallory = sy.WorkerClient("bob", lambda raw: federation.call("bob", raw, Sender("client", "mallory")))
    theirs = torch.zeros(3).tag("#data", "#mallory").send(mallory)
    assert sorted(tuple(p.shape) for p in bob.search("#data")) == [(2,), (2, 2)]
    assert bob.search("#mallory") == [], "another model owner's tags are its own"
    assert sorted(tuple(p.shape) for p in mallory.search("#data")) == [(2, 2), (3,)]
    assert mine.location is bob and theirs.location is mallory


def test_the_boundary_refuses_overlong_fields() -> None:
    core = WorkerCore("bob")

    def kind(raw: list[object]) -> str | None:
        reply = m.decode_reply(core.handle(encode(raw), Sender("client", "me")))
        return None if reply.error is None else reply.error[0]

    assert kind([3, [], 2, torch.ones(1), False, False, ["#a"], "x" * m.MAX_TEXT]) is None
    assert kind([3, [], 3, torch.ones(1), False, False, ["#a"], "x" * (m.MAX_TEXT + 1)]) == "protocol"
    assert kind([3, [], 4, torch.ones(1), False, False, ["#a"], 7]) == "protocol"
    assert kind([9, [], "a", ["b"] * m.MAX_TERMS]) is None
    assert kind([9, [], "a", ["b"] * (m.MAX_TERMS + 1)]) == "protocol"
    assert kind([9, [], "a", ["b" * 257]]) == "protocol"
    assert kind([9, [], "a" * 257, []]) == "protocol"
    assert kind([3, [], 5, torch.ones(1), False, False, ["a" * 257], ""]) == "protocol"
    assert not {3, 4, 5} & set(core.objects)


# -- data given to a VirtualWorker ---------------------------------------------------------------


def test_data_tuple_is_handed_over_and_reads_back(federation: sy.Federation) -> None:
    x = torch.randn(5, 3).tag("#x", "#train").describe("features")
    y = torch.arange(5).tag("#y", "#train")
    bob = sy.VirtualWorker(id="bob", federation=federation, data=(x, y))
    (px,) = bob.search(["#train", "features"])
    assert px.tags == {"#x", "#train"} and px.owners == []
    assert torch.equal(px.get(), x)
    (py,) = bob.search("#y")
    assert torch.equal(py.get(), y) and bob.object_count() == 2, "get() of a search result frees only its id"


def test_data_mapping_and_tensor_stay_private(federation: sy.Federation) -> None:
    for data in ({"data": SECRET}, SECRET):
        bob = sy.VirtualWorker(id="bob", federation=federation, data=data)
        (ptr,) = bob.search("#data")
        assert ptr.owners == ["bob"] and ptr.tags == {"#data"}
        with pytest.raises(sy.PermissionDenied):
            ptr.get()


def test_bad_data_says_which_forms_exist() -> None:
    with pytest.raises(TypeError, match="mapping"):
        sy.VirtualWorker(id="w", federation=sy.Federation(), data="oops")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="item 1"):
        sy.VirtualWorker(id="w", federation=sy.Federation(), data=(torch.ones(1), [1.0]))  # type: ignore[arg-type]


# -- _objects and clear_objects ------------------------------------------------------------------


def test_objects_show_values_only_where_the_model_owner_may_read(federation: sy.Federation) -> None:
    bob = sy.VirtualWorker(id="bob", federation=federation, data={"data": SECRET})
    x = torch.tensor([1.0, 2.0]).tag("#mine").send(bob)
    (private,) = bob.search("#data")
    mixed = private * 2.0
    objects = bob._objects
    assert torch.equal(objects[x.id_at_location], torch.tensor([1.0, 2.0]))
    objects[x.id_at_location].add_(5.0)
    assert torch.equal(x.get(), torch.tensor([1.0, 2.0])), "_objects shows copies"
    shown = " ".join(repr(v) for v in objects.values())  # the values' reprs (the ids are random digits)
    for value in ("123", "654", "246"):
        assert value not in shown, "a private value showed"
    placeholder = repr(objects[mixed.id_at_location])
    assert "(2, 2)" in placeholder and "float32" in placeholder and "private to ['bob']" in placeholder
    (data_id,) = [i for i, v in objects.items() if "#data" in repr(v)][:1]
    assert "private to ['bob']" in repr(objects[data_id])
    with pytest.raises(TypeError):
        objects[123] = torch.ones(1)  # type: ignore[index]


def test_objects_hide_other_model_owners(federation: sy.Federation) -> None:
    bob = sy.VirtualWorker(id="bob", federation=federation)
    mallory = sy.WorkerClient("bob", lambda raw: federation.call("bob", raw, Sender("client", "mallory")))
    kept = torch.full((3,), 7.0).send(mallory)
    assert kept.location is mallory and len(bob._objects) == 0


def test_objects_of_a_remote_worker_say_how_to_look_instead() -> None:
    core = WorkerCore("far")
    far = sy.WorkerClient("far", lambda raw: core.handle(raw, Sender("client", "me")))
    kept = torch.ones(2).tag("#a").send(far)
    assert len(far.search(["#a"])) == 1 and kept.tags == {"#a"}
    with pytest.raises(sy.OperationNotAllowed, match="search"):
        far._objects  # noqa: B018
    with pytest.raises(sy.OperationNotAllowed, match="flush"):
        far.clear_objects()


def test_clear_objects_frees_the_model_owners_objects_only(federation: sy.Federation) -> None:
    bob = sy.VirtualWorker(id="bob", federation=federation, data={"data": SECRET})
    x = torch.ones(3).send(bob)
    y = x + x
    model = nn.Linear(2, 1).send(bob)
    assert bob.object_count() == 5, "x, y, the model and its two tensors"
    assert bob.clear_objects() is bob
    assert bob.object_count() == 0
    assert len(bob._objects) == 1 and len(bob.search("#data")) == 1, "the worker's own data stays"
    with pytest.raises(sy.ObjectNotFound, match="freed"):
        y.get()
    with pytest.raises(sy.ObjectNotFound, match="freed"):
        (x * 2).get()
    with pytest.raises(sy.ObjectNotFound, match="freed"):
        model(torch.ones(1, 2).send(bob))


# -- the local worker and reprs ------------------------------------------------------------------


def test_the_local_worker_owns_every_pointer(bob: sy.VirtualWorker) -> None:
    hook = sy.TorchHook(torch)
    me = hook.local_worker
    assert me is sy.local_worker and me.id == "me" and len(me._objects) == 0
    ptr = torch.ones(1).send(bob)
    assert ptr.owner is me and ptr.location is bob and isinstance(ptr.id_at_location, int)
    assert me.is_client_worker is True
    me.is_client_worker = False
    assert me.is_client_worker is False
    me.is_client_worker = True
    with pytest.raises(TypeError, match="True or False"):
        me.is_client_worker = "no"  # type: ignore[assignment]
    assert "me" in repr(me) and "model owner" in repr(me) and "me" in me._repr_html_()


def test_worker_repr_counts_objects_and_states_the_policy(federation: sy.Federation) -> None:
    bob = sy.VirtualWorker(id="bob", federation=federation, data={"data": SECRET})
    kept = [torch.ones(1).send(bob), torch.ones(2).send(bob)]
    assert repr(bob).startswith("<VirtualWorker id:bob #objects:3 (1 private)")
    assert "aggregates of >=2 owners" in repr(bob)
    strict = sy.VirtualWorker(id="agg", federation=federation, policy=sy.Policy(strict=True))
    assert "strict aggregator" in repr(strict)
    page = bob._repr_html_()
    assert "bob" in page and "private to [&#x27;bob&#x27;]" in page and "123" not in _without_ids(page)
    assert f"{kept[0].id_at_location:#018x}" in page


def test_pointer_repr_says_where_what_and_whose(federation: sy.Federation) -> None:
    bob = sy.VirtualWorker(id="bob", federation=federation, data={"data": SECRET})
    ptr = torch.zeros(3, 2).tag("#a").describe("a short note").send(bob)
    text = repr(ptr)
    assert "@bob:" in text and "(3, 2)" in text and "float32" in text
    assert "#a" in text and "a short note" in text
    (private,) = bob.search("#data")
    assert "private to ['bob']" in repr(private)
    page = private._repr_html_()
    for fact in ("bob", "(2, 2)", "float32", "#data", "private to"):
        assert fact in page
    assert "123" not in _without_ids(page)
    ptr.get()
    assert "(gone)" in ptr._repr_html_()
