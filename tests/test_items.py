"""Items: CRUD, the list envelope, search, validation, ownership and mass assignment."""

import re
from collections.abc import Callable

import pytest
from httpx2 import Response
from sqlalchemy import Connection, delete, event, insert, select, update

from app.items.cache import ItemCache
from app.items.models import Item
from app.users.models import User
from tests.api import Api, assert_problem


def test_create_and_read_an_item(api: Api) -> None:
    alice = api.account("alice")
    response = api.client.post(
        "/api/v1/items",
        json={"title": "  Lamp  ", "description": "Desk lamp", "price": "19.99"},
        headers=alice.headers,
    )
    assert response.status_code == 201
    item = response.json()
    assert set(item) == {
        "id",
        "title",
        "description",
        "price",
        "is_available",
        "owner_id",
        "created_at",
        "updated_at",
    }
    assert (item["title"], item["price"], item["is_available"], item["owner_id"]) == (
        "Lamp",
        19.99,
        True,
        alice.id,
    )
    assert item["created_at"].endswith("Z")
    assert api.client.get(f"/api/v1/items/{item['id']}").json() == item


def test_creating_needs_a_user(api: Api) -> None:
    assert_problem(api.client.post("/api/v1/items", json={"title": "x", "price": 1}), 401)
    assert api.client.get("/api/v1/items").json()["total"] == 0


@pytest.mark.parametrize(
    "body",
    [
        {"title": "x", "price": 0},
        {"title": "x", "price": -1},
        {"title": "x", "price": "1.001"},
        {"title": "x", "price": "abc"},
        {"title": "", "price": 1},
        {"title": "   ", "price": 1},
        {"title": "x" * 201, "price": 1},
        # Invisible characters only (zero-width space, joiner, BOM, bidi override) would
        # list as a blank item.
        {"title": "\u200b\u200d\ufeff", "price": 1},
        {"title": " \u202e\u2028 ", "price": 1},
        {"price": 1},
        {"title": "x"},
        {"title": "x", "price": 1, "owner_id": 1},
        {"title": "x", "price": 1, "id": 5},
        {"title": "x", "price": 1, "created_at": "2020-01-01T00:00:00Z"},
        # PostgreSQL cannot store NUL; SQLite could, so both refuse it.
        {"title": "a\u0000b", "price": 1},
        {"title": "x", "description": "a\u0000b", "price": 1},
        # Only numbers and plain decimal strings are prices.
        {"title": "x", "price": "1_000"},
        {"title": "x", "price": " 5 "},
        {"title": "x", "price": "\u0661"},  # ARABIC-INDIC DIGIT ONE
        {"title": "x", "price": True},
        {"title": "x", "price": 1, "is_available": "yes"},
        {"title": "x", "price": 1, "is_available": 1},
    ],
)
def test_invalid_or_mass_assigning_bodies_are_422_and_create_nothing(api: Api, body: dict) -> None:
    alice = api.account("alice")
    body_error = assert_problem(
        api.client.post("/api/v1/items", json=body, headers=alice.headers), 422
    )
    assert body_error["errors"]
    assert all("loc" in error for error in body_error["errors"])
    assert api.client.get("/api/v1/items").json()["total"] == 0


def test_malformed_json_is_a_422_problem(api: Api) -> None:
    alice = api.account("alice")
    response = api.client.post(
        "/api/v1/items",
        content=b'{"title": "x", "price":',
        headers=alice.headers | {"Content-Type": "application/json"},
    )
    assert_problem(response, 422)


def test_list_envelope_paging_and_limits(api: Api) -> None:
    alice = api.account("alice")
    ids = [api.create_item(alice, title=f"item {n}")["id"] for n in range(5)]
    page = api.client.get("/api/v1/items?skip=1&limit=3").json()
    assert (page["total"], page["skip"], page["limit"]) == (5, 1, 3)
    assert [item["id"] for item in page["items"]] == ids[1:4]
    past_the_end = api.client.get("/api/v1/items?skip=7").json()
    assert (past_the_end["items"], past_the_end["total"]) == ([], 5)
    assert api.client.get("/api/v1/items").json()["limit"] == 20
    assert api.client.get("/api/v1/items?limit=100").status_code == 200
    for query in ("limit=0", "limit=101", "skip=-1", "limit=abc"):
        assert_problem(api.client.get(f"/api/v1/items?{query}"), 422)
    assert_problem(api.client.get("/api/v1/items", params={"q": "a\x00b"}), 422)


def test_search_matches_title_and_description_literally(api: Api) -> None:
    alice = api.account("alice")
    api.create_item(alice, title="Red lamp", description=None)
    api.create_item(alice, title="Chair", description="a LAMP-shaped chair")
    api.create_item(alice, title="100% cotton", description="shirt")
    api.create_item(alice, title="1000 cotton buds", description="box")
    found = api.client.get("/api/v1/items", params={"q": "lamp"}).json()
    assert sorted(item["title"] for item in found["items"]) == ["Chair", "Red lamp"]
    assert found["total"] == 2
    # '%' is a literal, not a LIKE wildcard.
    literal = api.client.get("/api/v1/items", params={"q": "100%"}).json()
    assert [item["title"] for item in literal["items"]] == ["100% cotton"]
    # Beyond ASCII too, on SQLite and PostgreSQL alike.
    api.create_item(alice, title="ÉTÉ sale", description=None)
    api.create_item(alice, title="Dessert", description="crème brûlée")
    for query, title in (("été", "ÉTÉ sale"), ("Été", "ÉTÉ sale"), ("CRÈME BRÛ", "Dessert")):
        matches = api.client.get("/api/v1/items", params={"q": query}).json()["items"]
        assert [item["title"] for item in matches] == [title], query


def test_owner_updates_and_deletes(api: Api) -> None:
    alice = api.account("alice")
    item = api.create_item(alice)
    response = api.client.patch(
        f"/api/v1/items/{item['id']}",
        json={"price": 25, "is_available": False},
        headers=alice.headers,
    )
    assert response.status_code == 200
    updated = response.json()
    assert (updated["price"], updated["is_available"], updated["title"]) == (25.0, False, "Lamp")
    assert updated["updated_at"] >= item["updated_at"]
    deleted = api.client.delete(f"/api/v1/items/{item['id']}", headers=alice.headers)
    assert deleted.status_code == 204
    assert_problem(api.client.get(f"/api/v1/items/{item['id']}"), 404)


@pytest.mark.parametrize(
    "body",
    [{"owner_id": 999}, {"id": 7}, {"title": None}, {"price": None}, {"is_available": None}],
)
def test_owner_cannot_reassign_or_null_required_fields(api: Api, body: dict) -> None:
    alice = api.account("alice")
    item = api.create_item(alice)
    response = api.client.patch(f"/api/v1/items/{item['id']}", json=body, headers=alice.headers)
    assert_problem(response, 422)
    assert api.client.get(f"/api/v1/items/{item['id']}").json() == item


def test_another_user_cannot_change_or_delete_an_item(api: Api) -> None:
    alice, bob = api.account("alice"), api.account("bob")
    mallory = api.account("mallory", role="moderator")
    item = api.create_item(alice)
    url = f"/api/v1/items/{item['id']}"
    for intruder in (bob, mallory):
        assert_problem(api.client.patch(url, json={"price": 1}, headers=intruder.headers), 403)
        assert_problem(api.client.delete(url, headers=intruder.headers), 403)
    assert_problem(api.client.patch(url, json={"price": 1}), 401)
    assert_problem(api.client.delete(url), 401)
    assert api.client.get(url).json() == item


def test_admin_can_change_and_delete_any_item(api: Api) -> None:
    alice, admin = api.account("alice"), api.account("boss", role="admin")
    item = api.create_item(alice)
    url = f"/api/v1/items/{item['id']}"
    patched = api.client.patch(url, json={"title": "Moderated"}, headers=admin.headers)
    assert patched.status_code == 200
    assert patched.json()["owner_id"] == alice.id
    assert api.client.delete(url, headers=admin.headers).status_code == 204


def test_an_item_has_one_url(api: Api) -> None:
    """Ids in paths are plain decimal digits: no other spelling reaches (or deletes) one."""
    alice = api.account("alice")
    ids = [api.create_item(alice)["id"] for _ in range(10)]
    assert ids[-1] == 10
    for spelling in ("1_0", "1.0", "+1", "01", "%201", "1%20", "1e1", "0x1"):
        assert_problem(api.client.get(f"/api/v1/items/{spelling}"), 422)
        assert_problem(api.client.delete(f"/api/v1/items/{spelling}", headers=alice.headers), 422)
    assert api.client.get("/api/v1/items").json()["total"] == 10


def test_unknown_items(api: Api) -> None:
    alice = api.account("alice")
    for method in ("GET", "PATCH", "DELETE"):
        response = api.client.request(
            method, "/api/v1/items/424242", json={"price": 1}, headers=alice.headers
        )
        assert_problem(response, 404)
    assert_problem(api.client.get(f"/api/v1/items/{2**31}"), 422)


def test_a_page_and_its_total_agree_while_rows_are_written(api: Api) -> None:
    """Another client adds an item while a page is read: the page held one item more than
    its total said when they came from two statements with the write in between."""
    alice = api.account("alice")
    for _ in range(3):
        api.create_item(alice)
    engine = api.client.app.state.engine.sync_engine  # type: ignore[attr-defined]
    columns = [column for column in Item.__table__.columns if column.name != "id"]
    copy = insert(Item.__table__).from_select(columns, select(*columns).order_by(Item.id).limit(1))
    reads: list[str] = []

    def another_client_writes(connection: Connection, *_: object) -> None:
        reads.append("read")
        if len(reads) == 1:
            connection.execute(copy)

    event.listen(engine, "after_cursor_execute", another_client_writes)
    try:
        page = api.client.get("/api/v1/items", params={"limit": 100}).json()
    finally:
        event.remove(engine, "after_cursor_execute", another_client_writes)
    assert reads  # the list was read from the database, not a cache
    assert page["total"] == len(page["items"])


def test_an_item_deleted_while_it_is_changed_is_a_404(api: Api) -> None:
    """Its owner deletes an item while an admin's change to it is under way: the change
    found no row to update, and the admin got a 500."""
    alice, admin = api.account("alice"), api.account("boss", role="admin")
    item = api.create_item(alice)
    url = f"/api/v1/items/{item['id']}"
    with api.meanwhile("UPDATE items", delete(Item).where(Item.id == item["id"])) as raced:
        response = api.client.patch(url, json={"title": "Moderated"}, headers=admin.headers)
    assert raced
    assert_problem(response, 404)


def test_an_account_deleted_while_it_creates_an_item_is_a_401(api: Api) -> None:
    """An admin deletes an account while its owner's new item is being saved: the item's
    owner no longer existed, and the client got a 500."""
    alice = api.account("alice")
    with api.meanwhile("INSERT INTO items", delete(User).where(User.id == alice.id)) as raced:
        response = api.client.post(
            "/api/v1/items", json={"title": "Lamp", "price": 1}, headers=alice.headers
        )
    assert raced
    assert_problem(response, 401)
    assert api.client.get("/api/v1/items").json()["total"] == 0


def test_of_two_deletes_of_one_item_only_one_succeeds(api: Api) -> None:
    """Two clients delete one item at once: both were told 204, though one deleted
    nothing (and the log got SQLAlchemy's warning); sent one after the other, the second
    is a 404."""
    alice = api.account("alice")
    item = api.create_item(alice)
    with api.meanwhile("DELETE FROM items", delete(Item).where(Item.id == item["id"])) as raced:
        response = api.client.delete(f"/api/v1/items/{item['id']}", headers=alice.headers)
    assert raced
    assert_problem(response, 404)


def test_a_patch_with_a_stale_if_match_is_a_412_and_changes_nothing(api: Api) -> None:
    """Two clients edit the same item from the copy they read: the second one's PATCH
    silently overwrote the first one's change."""
    alice, admin = api.account("alice"), api.account("boss", role="admin")
    url = f"/api/v1/items/{api.create_item(alice)['id']}"
    read = api.client.get(url)
    etag = read.headers["etag"]
    assert re.fullmatch(r'"[^"]+"', etag)  # strong (no W/): byte-for-byte the same
    assert api.client.get(url).headers["etag"] == etag  # unchanged item, same ETag
    first = api.client.patch(url, json={"price": 25}, headers=admin.headers | {"If-Match": etag})
    assert first.status_code == 200
    assert first.headers["etag"] != etag
    assert first.json()["updated_at"] != read.json()["updated_at"]
    assert first.headers["etag"] == api.client.get(url).headers["etag"]
    second = api.client.patch(
        url, json={"title": "Mine"}, headers=alice.headers | {"If-Match": etag}
    )
    assert_problem(second, 412)
    assert api.client.get(url).json() == first.json()
    # The current ETag, among others, or *, or no If-Match at all: the change is made.
    listed = f'"stale", {first.headers["etag"]}'
    for headers in ({"If-Match": listed}, {"If-Match": "*"}, {}):
        changed = api.client.patch(url, json={"title": "Mine"}, headers=alice.headers | headers)
        assert changed.status_code == 200, headers
    assert_problem(
        api.client.patch(url, json={"title": "Mine"}, headers=alice.headers | {"If-Match": etag}),
        412,
    )


def raced_by_a_change(
    api: Api,
    if_match: bool,
    statement: str,
    write: Callable[[str, dict[str, str]], Response],
) -> tuple[Response, str]:
    """``write`` (given the item's URL and headers, with its ETag in If-Match when
    ``if_match``) to alice's item, while another client's change to the item is committed
    just before the write's ``statement``: its answer and the item's URL."""
    alice = api.account("alice")
    item = api.create_item(alice)
    url = f"/api/v1/items/{item['id']}"
    headers = alice.headers | (
        {"If-Match": api.client.get(url).headers["etag"]} if if_match else {}
    )
    theirs = update(Item).where(Item.id == item["id"]).values(price=25)
    with api.meanwhile(statement, theirs) as raced:
        response = write(url, headers)
    assert raced
    return response, url


@pytest.mark.parametrize("if_match", [True, False])
def test_a_change_committed_between_the_check_and_the_write_is_a_412(
    api: Api, if_match: bool
) -> None:
    """Another client's change lands after this PATCH compared its If-Match with the
    item and before it writes: the If-Match held when checked, yet the write must not
    overwrite a version the client never saw. Without If-Match the last write wins."""
    response, url = raced_by_a_change(
        api,
        if_match,
        "UPDATE items",
        lambda url, headers: api.client.patch(url, json={"title": "Mine"}, headers=headers),
    )
    if if_match:
        assert_problem(response, 412)
        assert api.client.get(url).json()["title"] == "Lamp"
    else:
        assert response.status_code == 200
        assert (response.json()["title"], response.json()["price"]) == ("Mine", 25)


def test_a_stale_cached_copy_neither_causes_nor_hides_a_412(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache may serve an item's old copy for a moment after a write (its
    invalidation not yet arrived): If-Match is checked against the database."""
    alice = api.account("alice")
    url = f"/api/v1/items/{api.create_item(alice)['id']}"
    old = api.client.get(url).headers["etag"]  # now cached

    async def not_arrived(self: ItemCache, *item_ids: int) -> None:
        pass

    monkeypatch.setattr(ItemCache, "invalidate", not_arrived)
    first = api.client.patch(url, json={"price": 25}, headers=alice.headers | {"If-Match": old})
    assert first.status_code == 200
    assert api.client.get(url).headers["etag"] == old  # the stale copy
    stale = api.client.patch(url, json={"title": "A"}, headers=alice.headers | {"If-Match": old})
    assert_problem(stale, 412)
    current = {"If-Match": first.headers["etag"]}
    assert (
        api.client.patch(url, json={"title": "A"}, headers=alice.headers | current).status_code
        == 200
    )


@pytest.mark.parametrize("price", ["19.99", 19.5, 3])
def test_a_created_item_comes_with_its_url_and_etag(api: Api, price: str | float) -> None:
    """A client that creates an item can edit it with If-Match at once: the 201 gave no
    ETag (nor where the item lives), so it had to GET the item first."""
    alice = api.account("alice")
    created = api.client.post(
        "/api/v1/items", json={"title": "Lamp", "price": price}, headers=alice.headers
    )
    assert created.status_code == 201
    url = created.headers["location"]
    assert url == f"/api/v1/items/{created.json()['id']}"
    assert created.headers["content-location"] == url
    read = api.client.get(url)  # from the database, as the new item is not cached yet
    assert read.json() == created.json()
    assert created.headers["etag"] == read.headers["etag"]
    changed = api.client.patch(
        url, json={"price": 25}, headers=alice.headers | {"If-Match": created.headers["etag"]}
    )
    assert changed.status_code == 200


def test_a_delete_with_a_stale_if_match_is_a_412_and_deletes_nothing(api: Api) -> None:
    """A client deletes an item from the copy it read while another had changed it
    since: the DELETE ignored If-Match and the item, changed or not, was gone."""
    alice = api.account("alice")
    url = f"/api/v1/items/{api.create_item(alice)['id']}"
    read = api.client.get(url).headers["etag"]
    changed = api.client.patch(url, json={"price": 25}, headers=alice.headers)
    stale = api.client.delete(url, headers=alice.headers | {"If-Match": read})
    assert_problem(stale, 412)
    assert api.client.get(url).json() == changed.json()
    current = {"If-Match": f'"stale", {changed.headers["etag"]}'}
    assert api.client.delete(url, headers=alice.headers | current).status_code == 204
    assert_problem(api.client.get(url), 404)
    for headers in ({"If-Match": "*"}, {}):
        other = f"/api/v1/items/{api.create_item(alice)['id']}"
        assert api.client.delete(other, headers=alice.headers | headers).status_code == 204
        assert_problem(api.client.get(other), 404)


@pytest.mark.parametrize("if_match", [True, False])
def test_a_change_committed_just_before_a_delete_makes_it_a_412(api: Api, if_match: bool) -> None:
    """Another client's PATCH lands after this DELETE compared its If-Match with the
    item and before it deletes: the client would delete a version it never saw. Without
    If-Match the delete is made."""
    response, url = raced_by_a_change(
        api,
        if_match,
        "DELETE FROM items",
        lambda url, headers: api.client.delete(url, headers=headers),
    )
    if if_match:
        assert_problem(response, 412)
        assert api.client.get(url).status_code == 200  # not deleted
    else:
        assert response.status_code == 204
        assert_problem(api.client.get(url), 404)


@pytest.mark.parametrize("method", ["PATCH", "DELETE"])
def test_a_write_whose_if_none_match_names_the_item_is_a_412_and_changes_nothing(
    api: Api, method: str
) -> None:
    """A client that means "only if the item is not the one I know" (or "only if there is
    none", ``*``) sends If-None-Match: the PATCH or DELETE went ahead regardless."""
    alice = api.account("alice")
    url = f"/api/v1/items/{api.create_item(alice)['id']}"
    first = api.client.get(url)
    tag = first.headers["etag"]
    body = {"json": {"price": 25}} if method == "PATCH" else {}
    for header in (tag, f'"other", {tag}', f"W/{tag}", "*"):
        refused = api.client.request(
            method, url, headers=alice.headers | {"If-None-Match": header}, **body
        )
        assert_problem(refused, 412)
        assert api.client.get(url).json() == first.json(), header
    # If-Match is checked first, then If-None-Match: both must hold.
    both = {"If-Match": tag, "If-None-Match": tag}
    assert_problem(api.client.request(method, url, headers=alice.headers | both, **body), 412)
    other = {"If-Match": tag, "If-None-Match": '"other"'}
    done = api.client.request(method, url, headers=alice.headers | other, **body)
    assert done.status_code == (200 if method == "PATCH" else 204)
    if method == "PATCH":
        assert done.json()["price"] == 25
    else:
        assert_problem(api.client.get(url), 404)


def test_a_current_copy_is_revalidated_with_a_304(api: Api) -> None:
    """A client holding the item's current copy asks If-None-Match: it was sent the whole
    item again; now a 304 without a body, from the cache as from the database, and
    never once the item has changed."""
    alice = api.account("alice")
    url = f"/api/v1/items/{api.create_item(alice)['id']}"
    first = api.client.get(url)  # from the database, then cached
    tag = first.headers["etag"]
    for header in (tag, f'"other", {tag}', f"W/{tag}", "*"):
        for method in ("GET", "HEAD"):
            current = api.client.request(method, url, headers={"If-None-Match": header})
            assert (current.status_code, current.content) == (304, b""), (method, header)
            assert current.headers["etag"] == tag
            assert "content-type" not in current.headers
    assert api.client.get(url, headers={"If-None-Match": '"other"'}).json() == first.json()
    changed = api.client.patch(url, json={"price": 25}, headers=alice.headers)
    fresh = api.client.get(url, headers={"If-None-Match": tag})
    assert (fresh.status_code, fresh.json()) == (200, changed.json())
    assert fresh.headers["etag"] == changed.headers["etag"] != tag
    assert api.client.get(url, headers={"If-None-Match": fresh.headers["etag"]}).status_code == 304
    # If-Match on a read (RFC 9110 section 13.1.1): a copy that is not current is a 412.
    assert_problem(api.client.get(url, headers={"If-Match": tag}), 412)
    assert api.client.get(url, headers={"If-Match": fresh.headers["etag"]}).status_code == 200


def test_a_read_with_malformed_conditions_is_answered_in_full(api: Api) -> None:
    """Items have no Last-Modified, so date conditions are ignored, even unparsable ones:
    a year past what Python's integers hold was a 500. Entity tags that are not ones
    match nothing."""
    alice = api.account("alice")
    item = api.create_item(alice)
    for headers in (
        {"If-Modified-Since": "Mon, 01 Jan 99999999999999999999 00:00:00 GMT"},
        {"If-Unmodified-Since": "Mon, 01 Jan 2020 00:00:00 +99999999999999999999"},
        {"If-Modified-Since": "not a date"},
        {"If-None-Match": ""},
        {"If-None-Match": ', ,"unterminated'},
        {"If-None-Match": "W/"},
    ):
        read = api.client.get(f"/api/v1/items/{item['id']}", headers=headers)
        assert (read.status_code, read.json()) == (200, item), headers


def test_conditions_split_over_several_header_lines_are_one_list(api: Api) -> None:
    """A client or a proxy may send a list header as several lines (RFC 9110 section
    5.3); only the first was read, so a PATCH went ahead although its If-None-Match
    named the current ETag on its second line, and a current If-Match there was a 412."""
    alice = api.account("alice")
    url = f"/api/v1/items/{api.create_item(alice)['id']}"
    tag = api.client.get(url).headers["etag"]

    def split(name: str) -> list[tuple[str, str]]:
        return [*alice.headers.items(), (name, '"other"'), (name, tag)]

    assert api.client.get(url, headers=split("If-None-Match")).status_code == 304
    refused = api.client.patch(url, json={"price": 25}, headers=split("If-None-Match"))
    assert_problem(refused, 412)
    assert_problem(api.client.delete(url, headers=split("If-None-Match")), 412)
    assert api.client.get(url).headers["etag"] == tag
    changed = api.client.patch(url, json={"price": 25}, headers=split("If-Match"))
    assert changed.status_code == 200, changed.text
    tag = changed.headers["etag"]
    assert api.client.delete(url, headers=split("If-Match")).status_code == 204
