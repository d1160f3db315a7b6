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
