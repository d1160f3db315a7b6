import pytest

from deployments.image_store import ImageStore, StoreSpec, new_id, valid_id


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture(params=["memory", "directory"])
def store_factory(request, tmp_path):
    def make(**spec):
        backend = "memory" if request.param == "memory" else f"file://{tmp_path}/images"
        clock = Clock()
        return ImageStore(StoreSpec(backend=backend, **spec), clock=clock), clock

    return make


def test_put_then_get(store_factory):
    store, _ = store_factory()
    image_id = store.put(b"png bytes", "image/png")
    assert valid_id(image_id)
    assert store.get(image_id) == (b"png bytes", "image/png")


def test_images_expire(store_factory):
    store, clock = store_factory(ttl_s=60)
    image_id = store.put(b"x", "image/png")
    clock.now += 59
    assert store.get(image_id) is not None
    clock.now += 2
    assert store.get(image_id) is None and store.total_bytes == 0


def test_total_bytes_are_bounded_oldest_first(store_factory):
    store, _ = store_factory(max_bytes=10)
    first = store.put(b"aaaa", "image/png")
    second = store.put(b"bbbb", "image/png")
    third = store.put(b"cccc", "image/png")  # 12 bytes > 10: the oldest goes
    assert store.get(first) is None
    assert store.get(second) is not None and store.get(third) is not None
    assert store.total_bytes == 8


def test_unknown_and_malformed_ids(store_factory):
    store, _ = store_factory()
    assert store.get(new_id()) is None
    for bad in ("", "../../etc/passwd", "a" * 43 + "/", "x.json"):
        assert store.get(bad) is None


def test_ids_are_unguessable():
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 43 for i in ids)


def test_a_restarted_store_finds_what_the_backend_holds(tmp_path):
    backend = f"file://{tmp_path}/images"
    clock = Clock()
    before = ImageStore(StoreSpec(backend=backend, ttl_s=60, max_bytes=10), clock=clock)
    old = before.put(b"aaaa", "image/png")
    clock.now += 30
    kept = before.put(b"bbbb", "image/jpeg")
    clock.now += 1  # stored order is expiry order: keep the two apart
    newest = before.put(b"cc", "image/webp")
    (tmp_path / "images" / (new_id() + ".json")).write_text("{}")  # a write cut short
    broken = new_id()
    (tmp_path / "images" / broken).write_bytes(b"zz")
    (tmp_path / "images" / (broken + ".json")).write_text("not json")
    clock.now += 30  # `old` has expired; the others have not

    after = ImageStore(StoreSpec(backend=backend, ttl_s=60, max_bytes=10), clock=clock)
    assert after.get(old) is None
    assert after.get(kept) == (b"bbbb", "image/jpeg") and after.get(newest) == (b"cc", "image/webp")
    assert after.total_bytes == 6
    # Expired images and half-written ones are gone from the backend too.
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted(
        [kept, kept + ".json", newest, newest + ".json"])
    # The recovered order is the stored order: the oldest goes first when space runs out.
    after.put(b"dddddd", "image/png")
    assert after.get(kept) is None and after.get(newest) is not None


def test_a_restarted_memory_store_starts_empty():
    first = ImageStore(StoreSpec())
    image_id = first.put(b"x", "image/png")
    assert ImageStore(StoreSpec()).get(image_id) is None
