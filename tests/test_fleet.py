"""Several servers of one teacher: what a fleet decides without a server's answers (the answers themselves are
tested against real vLLM servers in tests/test_served.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kdkit.config.schema import TeacherConfig
from kdkit.teacher.fleet import Fleet, connect, identity_difference, share
from kdkit.teacher.served import ServedError, Server
from tests.vllm_server import free_port

SAID = {"model": "m", "root": "/models/m", "max_model_len": 2048, "vllm_version": "0.32.0", "max_logprobs": 64}


def test_the_first_field_a_server_says_otherwise_is_named_with_both_servers():
    same = [("http://a", SAID), ("http://b", {**SAID, "url": "http://b"})]
    assert identity_difference(same) is None  # its own URL aside
    other = [("http://a", SAID), ("http://b", SAID), ("http://c", {**SAID, "max_model_len": 1024})]
    assert identity_difference(other) == ("teacher server http://c serves max_model_len 1024, http://a 2048: the "
                                          "servers of one teacher must serve the same model the same way")


def test_one_url_is_one_server_and_a_url_named_twice_is_refused():
    assert isinstance(connect("http://127.0.0.1:1"), Server)
    assert isinstance(connect(["http://127.0.0.1:1", "http://127.0.0.1:2"]), Fleet)
    with pytest.raises(ServedError, match=r"teacher server http://127\.0\.0\.1:1 is named twice"):
        connect(["http://127.0.0.1:1", "http://127.0.0.1:1/v1/"])
    with pytest.raises(ValidationError, match="teacher.url: an empty list"):
        TeacherConfig(url=[])
    assert TeacherConfig(url=["http://a:1", "http://b:1"]).url == ["http://a:1", "http://b:1"]


def test_a_request_fails_only_when_no_server_is_left_and_each_loss_is_reported():
    urls = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]  # nothing listens there: refused at once
    said: list[str] = []
    fleet = connect(urls, "m", retries=0, log=said.append)
    with pytest.raises(ServedError, match="no teacher server answers") as e:
        fleet.tokenize(text="x")
    assert all(u in str(e.value) for u in urls) and sorted(fleet.left_out) == sorted(urls)
    assert said[0].startswith(f"teacher server {urls[0]} stopped answering") and said[0].endswith("go to the 1 left")
    assert said[1].endswith("none is left")
    fleet.rejoin_s = 0  # each request now asks the servers left out first: quiet while they do not answer
    with pytest.raises(ServedError, match="no teacher server answers"):
        fleet.tokenize(text="x")
    assert len(said) == 2 and sorted(fleet.left_out) == sorted(urls)


def test_ranks_take_their_own_servers_when_there_are_enough():
    urls = [f"http://127.0.0.1:{p}" for p in (1, 2, 3, 4)]
    said: list[str] = []
    fleet = connect(urls, log=said.append)
    assert [s.url for s in share(fleet, 1, 2, said.append).servers] == [urls[1], urls[3]]
    assert share(fleet, 2, 4, said.append).url == urls[2]
    assert share(fleet, 0, 1, said.append) is fleet and not said
    assert share(fleet, 0, 8, said.append) is fleet and "the ranks share them" in said[0]
