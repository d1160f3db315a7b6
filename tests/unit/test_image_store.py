import asyncio
import math

import pytest

from deployments.store.image_store import (
    IMAGE,
    INPUT,
    ImageStore,
    ImageStoreDeployment,
    Limits,
    PoolSpec,
    StoreRefused,
    StoreSpec,
    new_id,
    valid_id,
)

BIG = Limits(10**12, 10**9)  # no cap in the way


def spec(backend="memory", *, ttl_s=3600.0, max_bytes=10**12, max_entries=10**9, per_key=BIG,
         inputs_ttl_s=86400.0, inputs=BIG, inputs_per_key=BIG) -> StoreSpec:
    return StoreSpec(backend, PoolSpec(ttl_s, Limits(max_bytes, max_entries), per_key),
                     PoolSpec(inputs_ttl_s, inputs, inputs_per_key))


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture(params=["memory", "directory"])
def store_factory(request, tmp_path):
    def make(**options):
        backend = "memory" if request.param == "memory" else f"file://{tmp_path}/images"
        clock = Clock()
        return ImageStore(spec(backend, **options), clock=clock), clock

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


def test_the_number_of_entries_is_bounded_too(store_factory):
    """Tiny images (an 8x8 upscale, n=4) cost almost no bytes: the entry cap holds them."""
    store, _ = store_factory(max_entries=4)
    first = store.put_many([(b"p" * 100, "image/png")] * 4)
    second = store.put_many([(b"q" * 100, "image/png")] * 2)  # the two oldest go
    assert [store.get(i) is None for i in first] == [True, True, False, False]
    assert all(store.get(i) is not None for i in second)
    assert store.usage(IMAGE) == (400, 4)


def test_unknown_and_malformed_ids(store_factory):
    store, _ = store_factory()
    assert store.get(new_id()) is None
    for bad in ("", "../../etc/passwd", "a" * 43 + "/", "x.json"):
        assert store.get(bad) is None


def test_ids_are_unguessable():
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 43 for i in ids)


class Counted(float):
    """A time that counts how often it is compared: the work expiry and eviction do."""

    comparisons = 0

    def __add__(self, other):
        return Counted(float(self) + other)

    __radd__ = __add__


def _counting(name):
    def compare(self, other):
        Counted.comparisons += 1
        return getattr(float, name)(self, other)

    return compare


for _name in ("__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__"):
    setattr(Counted, _name, _counting(_name))
Counted.__hash__ = float.__hash__


@pytest.mark.parametrize("case", ["puts", "puts that evict", "puts and gets that expire"])
def test_every_call_costs_log_n_comparisons_not_n(case):
    """A scan of every entry per call (20,000 puts: 2 x 10^8 comparisons) would fail this by
    far; a heap costs about 2 log2(n) per call."""
    n = 5000
    now = [Counted(1000.0)]
    options = {"max_entries": n // 4} if case == "puts that evict" else {}
    store = ImageStore(spec(ttl_s=100.0, **options), clock=lambda: now[0])
    Counted.comparisons = 0
    for i in range(n):
        image_id = store.put(b"x" * 10, "image/png", owner=f"key-{i % 7}")
        if case == "puts and gets that expire":
            now[0] = Counted(1000.0 + i * 0.05)  # entries expire all along (100 s = 2000 puts)
            store.get(image_id)
    per_call = Counted.comparisons / n
    assert per_call < 4 * math.log2(n) + 10, per_call
    if case == "puts that evict":
        assert store.usage(IMAGE)[1] <= n // 4
    if case == "puts and gets that expire":
        assert store.usage(IMAGE)[1] <= 2001


def test_a_key_over_its_share_loses_its_own_oldest_images_never_anothers(store_factory):
    store, _ = store_factory(per_key=Limits(10**6, 2))
    other = store.put(b"b" * 10, "image/png", owner="key-b")
    mine = [store.put(b"a" * 10, "image/png", owner="key-a") for _ in range(3)]
    assert store.get(mine[0]) is None and all(store.get(i) for i in mine[1:])
    assert store.get(other) is not None
    assert store.usage(IMAGE, "key-a") == (20, 2) and store.usage(IMAGE, "key-b") == (10, 1)


def test_a_full_store_refuses_a_key_rather_than_evicting_others(store_factory):
    store, _ = store_factory(max_bytes=30, per_key=Limits(20, 100))
    held = [store.put(b"x" * 10, "image/png", owner=owner) for owner in ("a", "a", "b")]
    with pytest.raises(StoreRefused) as refused:
        store.put(b"c" * 10, "image/png", owner="c")  # only a's and b's data could make room
    assert refused.value.reason == "full" and "full of other keys' images" in refused.value.message
    assert all(store.get(i) is not None for i in held)
    # b's own image makes room for b's next one; a's and the rest stay.
    newer = store.put(b"y" * 10, "image/png", owner="b")
    assert store.get(held[2]) is None and store.get(newer) is not None
    assert store.get(held[0]) is not None and store.get(held[1]) is not None


def test_anonymous_callers_share_the_whole_store_with_keys_off(store_factory):
    store, _ = store_factory(max_entries=5, per_key=Limits(10**6, 1))
    ids = [store.put(b"x", "image/png") for _ in range(5)]  # owner "": the per-key share is not its
    assert all(store.get(i) is not None for i in ids)


def test_a_put_of_several_images_is_stored_whole_or_not_at_all(store_factory):
    store, _ = store_factory(max_bytes=25, per_key=Limits(20, 100))
    store.put(b"x" * 10, "image/png", owner="a")
    store.put(b"x" * 10, "image/png", owner="b")
    with pytest.raises(StoreRefused):
        store.put_many([(b"1" * 2, "image/png"), (b"2" * 4, "image/png")], owner="c")
    assert store.usage(IMAGE) == (20, 2)
    with pytest.raises(StoreRefused) as refused:
        store.put(b"z" * 21, "image/png", owner="a")
    assert refused.value.reason == "too_large" and store.usage(IMAGE) == (20, 2)


def test_job_uploads_are_never_evicted_by_images(store_factory):
    store, _ = store_factory(max_bytes=20, max_entries=2, per_key=Limits(20, 2),
                             inputs=Limits(100, 10), inputs_per_key=Limits(50, 5))
    upload = store.put(b"u" * 40, "image/png", owner="a", kind=INPUT)
    for _ in range(10):  # images churn in their own pool
        store.put(b"i" * 10, "image/png", owner="a")
    assert store.get(upload, INPUT) == (b"u" * 40, "image/png")
    # An upload is not an image: the files route never serves it, and the reverse.
    assert store.get(upload) is None
    image = store.put(b"i", "image/png", owner="a")
    assert store.get(image, INPUT) is None


def test_job_uploads_past_a_cap_are_refused_not_evicted(store_factory):
    store, _ = store_factory(inputs=Limits(100, 3), inputs_per_key=Limits(50, 2))
    first = store.put(b"a" * 20, "image/png", owner="a", kind=INPUT)
    store.put(b"a" * 20, "image/png", owner="a", kind=INPUT)
    with pytest.raises(StoreRefused) as over_share:
        store.put(b"a" * 5, "image/png", owner="a", kind=INPUT)
    assert over_share.value.reason == "key_quota" and "job uploads" in over_share.value.message
    assert store.get(first, INPUT) is not None
    store.put(b"b" * 20, "image/png", owner="b", kind=INPUT)
    with pytest.raises(StoreRefused) as full:  # 3 uploads in all
        store.put(b"c", "image/png", owner="c", kind=INPUT)
    assert full.value.reason == "full"
    assert store.delete([first]) == 1 and store.get(first, INPUT) is None  # its job ended
    store.put(b"c", "image/png", owner="c", kind=INPUT)


def test_job_uploads_live_their_own_ttl(store_factory):
    store, clock = store_factory(ttl_s=60, inputs_ttl_s=600)
    upload = store.put(b"u", "image/png", owner="a", kind=INPUT)
    image = store.put(b"i", "image/png", owner="a")
    clock.now += 61
    assert store.get(image) is None and store.get(upload, INPUT) is not None
    clock.now += 540
    assert store.get(upload, INPUT) is None and store.usage(INPUT) == (0, 0)


def test_a_restarted_store_finds_what_the_backend_holds(tmp_path):
    backend = f"file://{tmp_path}/images"
    clock = Clock()
    before = ImageStore(spec(backend, ttl_s=60, max_bytes=10), clock=clock)
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

    after = ImageStore(spec(backend, ttl_s=60, max_bytes=10), clock=clock)
    assert after.get(old) is None
    assert after.get(kept) == (b"bbbb", "image/jpeg") and after.get(newest) == (b"cc", "image/webp")
    assert after.total_bytes == 6
    # Expired images and half-written ones are gone from the backend too.
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted(
        [kept, kept + ".json", newest, newest + ".json"])
    # The recovered order is the stored order: the oldest goes first when space runs out.
    after.put(b"dddddd", "image/png")
    assert after.get(kept) is None and after.get(newest) is not None


def test_job_uploads_and_owners_survive_a_restart_of_a_directory_store(tmp_path):
    backend = f"file://{tmp_path}/images"
    options = dict(per_key=Limits(10**6, 2), inputs_per_key=Limits(10**6, 1))
    before = ImageStore(spec(backend, **options))
    upload = before.put(b"upload", "image/png", owner="a", kind=INPUT)
    images = [before.put(b"i", "image/png", owner="a") for _ in range(2)]

    after = ImageStore(spec(backend, **options))
    assert after.get(upload, INPUT) == (b"upload", "image/png") and after.get(upload) is None
    assert after.usage(INPUT, "a") == (6, 1) and after.usage(IMAGE, "a") == (2, 2)
    with pytest.raises(StoreRefused):  # the key's share is still counted
        after.put(b"u", "image/png", owner="a", kind=INPUT)
    after.put(b"i", "image/png", owner="a")
    assert after.get(images[0]) is None and after.get(images[1]) is not None


def test_a_restarted_memory_store_starts_empty():
    first = ImageStore(spec())
    image_id = first.put(b"x", "image/png", kind=INPUT)
    assert ImageStore(spec()).get(image_id, INPUT) is None


def test_a_directory_stores_io_runs_off_the_replicas_event_loop(tmp_path):
    deployment = ImageStoreDeployment(spec(f"file://{tmp_path}/images"))
    fs = deployment.store._fs
    opened_on_loop = []
    real_open = fs.open

    def open_and_record(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            opened_on_loop.append(True)
        except RuntimeError:  # no loop in this thread: a worker thread
            opened_on_loop.append(False)
        return real_open(*args, **kwargs)

    fs.open = open_and_record

    async def calls():
        image_id = await deployment.put(b"x", "image/png", "a", IMAGE)
        found = await deployment.get(image_id, IMAGE)
        await deployment.delete([image_id])
        return found

    assert asyncio.run(calls()) == (b"x", "image/png")
    assert opened_on_loop and not any(opened_on_loop)
