"""RegisterTask is idempotent per client upload id: a retry of a register that was published returns it.

Over a real server: the same id twice gives one version (and survives a kill -9 of
the server: the id is stored in the version folder); an id with other content, a
malformed id and a second id inside one upload are refused with INVALID_ARGUMENT and
the server serves the next call; the SDK sends one id per register call and reuses
it when it retries after the first attempt was published but its answer was lost.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
import pytest
from serverproc import ServerProcess, make_repository

from clients import AsyncClient, Client, ClientError
from clients.core import RetryPolicy
from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration


def chunks(bundle: Path, upload_id: str = "", size: int = 4096, later_id: str = ""):
    first = True
    for fname in ("task.json", "adapter.safetensors"):
        data = (bundle / fname).read_bytes()
        for i in range(0, len(data), size):
            yield pb.RegisterTaskChunk(filename=fname, data=data[i:i + size],
                                       upload_id=upload_id if first else later_id)
            first = False


def versions(repo: Path, task: str) -> list[str]:
    return sorted(p.name for p in (repo / "tasks" / task).iterdir())


def latest(repo: Path, task: str = "alpha") -> int:
    return max(int(v) for v in versions(repo, task))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_repository(tmp_path_factory.mktemp("upload-id") / "repo")


@pytest.fixture(scope="module")
def server(repo):
    srv = ServerProcess(repo, "--allow-insecure-admin", "--poll-interval-s", "0", "--no-warmup", "--keep-versions", "5")
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, repo):
    """A copy of alpha v1 (the upload source; the stored folder changes as versions are published)."""
    import shutil

    out = tmp_path_factory.mktemp("bundle") / "alpha"
    shutil.copytree(repo / "tasks" / "alpha" / "1", out)
    (out / "content.sha256").unlink(missing_ok=True)
    return out


def test_same_upload_id_twice_is_one_version(server, repo, bundle):
    admin = pb_grpc.TaskAdminStub(grpc.insecure_channel(server.address))
    first = admin.RegisterTask(chunks(bundle, "id-twice"), timeout=60).task
    before = versions(repo, "alpha")
    again = admin.RegisterTask(chunks(bundle, "id-twice"), timeout=60).task
    assert again == first and versions(repo, "alpha") == before
    other = admin.RegisterTask(chunks(bundle, "id-other"), timeout=60).task  # a new id is a new version
    assert other.version == first.version + 1
    plain = admin.RegisterTask(chunks(bundle), timeout=60).task  # no id: published every time, as before
    assert plain.version == other.version + 1
    assert admin.RegisterTask(chunks(bundle, "id-twice"), timeout=60).task == first  # an older version too
    assert not list(repo.glob("tasks/.upload-*"))


@pytest.mark.parametrize("make, message", [
    (lambda b: chunks(b, "bad id with spaces"), "is not 1-128 characters"),
    (lambda b: chunks(b, "x" * 129), "is not 1-128 characters"),
    (lambda b: chunks(b, "id-a", later_id="id-b"), "inside upload 'id-a'"),
])
def test_bad_upload_ids_are_refused(server, repo, bundle, make, message):
    admin = pb_grpc.TaskAdminStub(grpc.insecure_channel(server.address))
    before = versions(repo, "alpha")
    with pytest.raises(grpc.RpcError) as e:
        admin.RegisterTask(make(bundle), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details(), e.value.details()
    assert versions(repo, "alpha") == before and not list(repo.glob("tasks/.upload-*"))
    assert admin.RegisterTask(chunks(bundle, f"after-{len(message)}-{id(make)}"), timeout=60).task.name == "alpha"


def test_same_id_with_other_content_is_refused(server, repo, bundle, tmp_path):
    import shutil

    admin = pb_grpc.TaskAdminStub(grpc.insecure_channel(server.address))
    first = admin.RegisterTask(chunks(bundle, "id-content"), timeout=60).task
    changed = tmp_path / "changed"
    shutil.copytree(bundle, changed)
    data = bytearray((changed / "adapter.safetensors").read_bytes())
    data[-4:] = b"\x00\x00\x80\x3f"  # the last float becomes 1.0
    (changed / "adapter.safetensors").write_bytes(bytes(data))
    before = versions(repo, "alpha")
    with pytest.raises(grpc.RpcError) as e:
        admin.RegisterTask(chunks(changed, "id-content"), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"already published alpha version {first.version} with other content" in e.value.details()
    assert versions(repo, "alpha") == before
    assert admin.RegisterTask(chunks(bundle, "id-content"), timeout=60).task == first  # still served


class _LostAnswer(grpc.RpcError):
    """What the SDK sees when the server died after publishing, before its answer arrived."""

    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "connection reset (simulated after the server published)"


def test_sdk_retry_after_a_published_register_returns_the_first_version(server, repo, bundle):
    with Client(server.address, retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.01)) as c:
        real, sent = c._admin.RegisterTask, []

        def answer_lost_once(request_iterator, **kwargs):
            request = list(request_iterator)
            sent.append(request[0].upload_id)
            response = real(iter(request), **kwargs)  # published on the real server
            if len(sent) == 1:
                raise _LostAnswer()
            return response

        c._admin.RegisterTask = answer_lost_once
        before = latest(repo)
        info = c.register(bundle)
        assert len(sent) == 2 and sent[0] == sent[1] and sent[0], sent
        assert latest(repo) == before + 1 == info.version  # published once
        assert c.describe_task("alpha").version == info.version
        second = c.register(bundle)  # a new call is a new upload id: a new version
        assert second.version == info.version + 1


def test_async_sdk_reuses_the_upload_id_on_retry(server, repo, bundle):
    async def go():
        async with AsyncClient(server.address, retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.01)) as c:
            real, sent = c._admin.RegisterTask, []

            async def answer_lost_once(request_iterator, **kwargs):
                request = list(request_iterator)
                sent.append(request[0].upload_id)
                response = await real(iter(request), **kwargs)
                if len(sent) == 1:
                    raise _LostAnswer()
                return response

            c._admin.RegisterTask = answer_lost_once
            before = latest(repo)
            info = await c.register(bundle)
            assert len(sent) == 2 and sent[0] == sent[1] and sent[0], sent
            assert latest(repo) == before + 1 == info.version
            return info

    assert asyncio.run(go()).name == "alpha"


def test_upload_id_survives_kill_9(tmp_path, bundle):
    repo = make_repository(tmp_path / "repo")
    srv = ServerProcess(repo, "--allow-insecure-admin", "--poll-interval-s", "0", "--no-warmup")
    try:
        admin = pb_grpc.TaskAdminStub(grpc.insecure_channel(srv.address))
        first = admin.RegisterTask(chunks(bundle, "id-kill"), timeout=60).task
        srv.stop(signal.SIGKILL)
    finally:
        srv.close()
    assert (repo / "tasks" / "alpha" / str(first.version) / "upload.id").read_text().strip() == "id-kill"
    with ServerProcess(repo, "--allow-insecure-admin", "--poll-interval-s", "0", "--no-warmup") as srv2:
        with Client(srv2.address) as c:
            with pytest.raises(ClientError):
                c.register(tmp_path / "missing")  # a local error first: nothing is sent
            again = pb_grpc.TaskAdminStub(grpc.insecure_channel(srv2.address)).RegisterTask(
                chunks(bundle, "id-kill"), timeout=60).task
            assert again == first and versions(repo, "alpha") == ["1", str(first.version)]
            assert c.describe_task("alpha").version == first.version
