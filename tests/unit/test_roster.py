"""Reconciling the upstreams file with the gateway's upstreams: add, drain, re-add, reload,
DNS. The members here are a plain record of what the roster asked for; the parts behind the
real members are tested in test_membership.py."""

from __future__ import annotations

import os
from pathlib import Path

from gateway.roster import Member, Plan, Roster, plan, targets
from gateway.upstreams_file import DnsEntry, UrlEntry


class Members:
    """What the roster changed; ``inflight`` says which draining members still have work."""

    def __init__(self) -> None:
        self.members: dict[str, Member] = {}
        self.urls: dict[str, str] = {}
        self.inflight: set[str] = set()

    def present(self) -> dict[str, Member]:
        return dict(self.members)

    def add(self, name: str, target: UrlEntry) -> None:
        self.members[name] = Member(target.overflow, draining=False)
        self.urls[name] = target.url

    def drain(self, name: str) -> None:
        self.members[name] = Member(self.members[name].overflow, draining=True)

    def undrain(self, name: str, target: UrlEntry) -> None:
        self.members[name] = Member(target.overflow, draining=False)

    def set_overflow(self, name: str, overflow: bool) -> None:
        self.members[name] = Member(overflow, self.members[name].draining)

    def forget_drained(self) -> list[str]:
        gone = [n for n, m in self.members.items() if m.draining and n not in self.inflight]
        for name in gone:
            del self.members[name]
        return gone


def test_plan_adds_the_new_drains_the_removed_and_undrains_the_relisted() -> None:
    present = {
        "a:1": Member(overflow=False, draining=False),
        "b:1": Member(overflow=False, draining=False),
        "c:1": Member(overflow=False, draining=True),
        "d:1": Member(overflow=False, draining=False),
    }
    wanted = {
        "a:1": UrlEntry("http://a:1"),
        "c:1": UrlEntry("http://c:1", overflow=True),
        "d:1": UrlEntry("http://d:1", overflow=True),
        "e:1": UrlEntry("http://e:1"),
    }
    assert plan(present, wanted) == Plan(
        add={"e:1": UrlEntry("http://e:1")},
        drain=("b:1",),
        undrain={"c:1": UrlEntry("http://c:1", overflow=True)},
        reflag={"d:1": UrlEntry("http://d:1", overflow=True)},
    )


def test_plan_of_an_unchanged_set_is_empty() -> None:
    present = {"a:1": Member(overflow=True, draining=False)}
    assert not plan(present, {"a:1": UrlEntry("http://a:1", overflow=True)})


def test_targets_expand_dns_entries_to_every_address_they_resolve_to() -> None:
    dns = DnsEntry("vllm", 8000, overflow=True)
    entries = (UrlEntry("http://10.0.0.1:8000"), dns)
    resolved = {dns: ["10.0.0.1", "10.0.0.2", "fd00::7"]}
    assert targets(entries, resolved) == {
        "10.0.0.1:8000": UrlEntry("http://10.0.0.1:8000"),  # the first entry naming it wins
        "10.0.0.2:8000": UrlEntry("http://10.0.0.2:8000", overflow=True),
        "[fd00::7]:8000": UrlEntry("http://[fd00::7]:8000", overflow=True),
    }


def write(path: Path, *urls: str, mtime_ns: int) -> None:
    path.write_text("".join(f'[[upstream]]\nurl = "{u}"\n' for u in urls))
    os.utime(path, ns=(mtime_ns, mtime_ns))  # explicit: two writes in one tick must differ


async def test_a_changed_file_adds_and_drains_and_a_drained_one_is_forgotten(
    tmp_path: Path,
) -> None:
    path = tmp_path / "upstreams.toml"
    write(path, "http://a:1", mtime_ns=1_000_000_000)
    members, reloads = Members(), list[bool]()
    roster = Roster(path, (UrlEntry("http://a:1"),), members, 1.0, on_reload=reloads.append)
    await roster.refresh()
    assert members.present() == {"a:1": Member(False, False)}

    write(path, "http://a:1", "http://b:1", mtime_ns=2_000_000_000)
    await roster.refresh()
    assert set(members.present()) == {"a:1", "b:1"}
    assert reloads == [True]

    members.inflight.add("a:1")  # a request still runs there
    write(path, "http://b:1", mtime_ns=3_000_000_000)
    await roster.refresh()
    assert members.present()["a:1"] == Member(False, draining=True)
    await roster.refresh()  # no change to the file: still draining while work runs
    assert members.present()["a:1"].draining

    write(path, "http://a:1", "http://b:1", mtime_ns=4_000_000_000)
    await roster.refresh()  # listed again before it drained: the drain is cancelled
    assert members.present()["a:1"] == Member(False, draining=False)

    write(path, "http://b:1", mtime_ns=5_000_000_000)
    await roster.refresh()
    members.inflight.clear()  # its last request finished
    await roster.refresh()
    assert set(members.present()) == {"b:1"}
    assert reloads == [True, True, True, True]


async def test_an_invalid_reload_is_refused_and_the_set_kept(tmp_path: Path) -> None:
    path = tmp_path / "upstreams.toml"
    write(path, "http://a:1", mtime_ns=1_000_000_000)
    members, reloads = Members(), list[bool]()
    roster = Roster(path, (UrlEntry("http://a:1"),), members, 1.0, on_reload=reloads.append)
    await roster.refresh()
    path.write_text('[[upstream]]\nurl = "http://b:1"\nweight = 3\n')
    await roster.refresh()
    assert reloads == [False]
    assert members.present() == {"a:1": Member(False, False)}
    path.unlink()  # a file that is gone is refused the same way
    await roster.refresh()
    assert reloads == [False, False]
    assert set(members.present()) == {"a:1"}


async def test_sighup_reloads_even_when_the_mtime_did_not_change(tmp_path: Path) -> None:
    path = tmp_path / "upstreams.toml"
    write(path, "http://a:1", mtime_ns=1_000_000_000)
    members: Members = Members()
    roster = Roster(path, (UrlEntry("http://a:1"),), members, 1.0)
    await roster.refresh()
    write(path, "http://b:1", mtime_ns=1_000_000_000)  # same mtime: polling cannot see it
    await roster.refresh()
    assert set(members.present()) == {"a:1"}
    roster.wake()
    await roster.refresh()
    # a:1 had nothing in flight: drained and forgotten in the same pass
    assert members.present() == {"b:1": Member(False, False)}


async def test_a_failed_lookup_keeps_the_last_addresses(tmp_path: Path) -> None:
    dns = DnsEntry("vllm", 8000)
    answers: list[list[str] | OSError] = [
        ["10.0.0.1", "10.0.0.2"],
        OSError("SERVFAIL"),
        ["10.0.0.2"],
    ]

    async def resolve(host: str, port: int) -> list[str]:
        assert (host, port) == ("vllm", 8000)
        answer = answers.pop(0)
        if isinstance(answer, OSError):
            raise answer
        return answer

    members = Members()
    roster = Roster(tmp_path / "unused.toml", (dns,), members, 1.0, resolve=resolve)
    await roster.refresh()
    assert set(members.present()) == {"10.0.0.1:8000", "10.0.0.2:8000"}
    await roster.refresh()  # the lookup failed: nothing drains
    assert not any(m.draining for m in members.present().values())
    await roster.refresh()  # the name now lists one address: the other drains, then goes
    assert set(members.present()) == {"10.0.0.2:8000"}
    assert members.urls["10.0.0.2:8000"] == "http://10.0.0.2:8000"


async def test_the_real_resolver_reads_localhost() -> None:
    from gateway.roster import getaddrinfo

    assert "127.0.0.1" in await getaddrinfo("localhost", 8000)
