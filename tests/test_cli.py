"""Flags → Settings: A1111's defaults, COMMANDLINE_ARGS, ignored and unknown flags, credentials."""

import logging
from pathlib import Path

import pytest

from sdserver.cli import command_line, load_settings, parse_credentials, read_credentials_file
from sdserver.settings import Credential

log = logging.getLogger("test-cli")


def settings(*argv, env=None):
    return load_settings(list(argv), env or {}, logger=log)


def test_defaults_follow_a1111(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = settings()
    assert (s.host, s.port, s.webui) == ("127.0.0.1", 7860, True)
    assert s.data_dir == tmp_path
    assert s.checkpoint_dir == tmp_path / "models" / "Stable-diffusion"
    assert s.vae_folder == tmp_path / "models" / "VAE"
    assert s.lora_folder == tmp_path / "models" / "Lora"
    assert s.embeddings_folder == tmp_path / "embeddings"
    assert (s.queue_size, s.job_ttl, s.precision) == (64, 3600.0, "autocast")


def test_nowebui_defaults_to_7861_unless_a_port_is_given():
    assert settings("--nowebui").port == 7861
    assert settings("--nowebui", "--port", "9000").port == 9000
    assert not settings("--nowebui").webui


def test_listen_and_server_name():
    assert settings("--listen").host == "0.0.0.0"
    assert settings("--listen", "--server-name", "10.0.0.2").host == "10.0.0.2"


def test_folders_override_the_layout(tmp_path):
    s = settings("--data-dir", str(tmp_path), "--models-dir", "/m", "--ckpt-dir", "/c", "--lora-dir", "/l")
    assert s.checkpoint_dir == Path("/c") and s.lora_folder == Path("/l")
    assert s.vae_folder == Path("/m/VAE") and s.embeddings_folder == tmp_path / "embeddings"


def test_precision_flags():
    assert not settings("--no-half").half_precision
    assert not settings("--precision", "full").half_precision
    assert settings().half_precision
    with pytest.raises(SystemExit):
        settings("--precision", "quarter")


def test_limits_and_queue_flags():
    s = settings("--max-steps", "80", "--max-batch", "4", "--queue-size", "3", "--job-ttl", "60",
                 "--cancel-on-disconnect", "--api-allow-remote-images")
    assert (s.limits.max_steps, s.limits.max_batch, s.queue_size, s.job_ttl) == (80, 4, 3, 60.0)
    assert s.cancel_on_disconnect and s.api_allow_remote_images
    with pytest.raises(SystemExit):
        settings("--queue-size", "0")


def test_commandline_args_env_is_prepended():
    env = {"COMMANDLINE_ARGS": "--api --port 7000 --cors-allow-origins 'http://a.example,http://b.example'"}
    assert command_line(["--listen"], env)[-1] == "--listen"
    s = settings("--port", "7001", env=env)
    assert s.port == 7001  # the command line comes after, so it wins
    assert s.cors_allow_origins == ("http://a.example", "http://b.example")


def test_ignored_and_unknown_flags_warn_once(caplog):
    with caplog.at_level(logging.WARNING, logger="test-cli"):
        s = settings("--xformers", "--lowram", "--theme", "dark", "--enable-insecure-extension-access",
                     "--made-up-flag", "--other=3", "--port", "7000")
    assert s.port == 7000
    warnings = [r.getMessage() for r in caplog.records if r.name == "test-cli"]
    assert len(warnings) == 1
    for flag in ("--xformers", "--lowram", "--theme", "--enable-insecure-extension-access", "--made-up-flag",
                 "--other"):
        assert flag in warnings[0]
    assert "dark" not in warnings[0]


def test_no_warning_without_ignored_flags(caplog):
    with caplog.at_level(logging.WARNING, logger="test-cli"):
        settings("--api", "--port", "7000")
    assert not [r for r in caplog.records if r.name == "test-cli"]


def test_api_auth_and_auth_file(tmp_path):
    path = tmp_path / "auth.txt"
    path.write_text("# users\ncarol:c-pw, dave:d:pw\n\n")
    s = settings("--api-auth", "alice:a-pw,bob:b-pw", "--api-auth-file", str(path))
    assert s.api_auth == (Credential("alice", "a-pw"), Credential("bob", "b-pw"), Credential("carol", "c-pw"),
                          Credential("dave", "d:pw"))
    assert "a-pw" not in repr(s)


def test_cmd_flags_view_redacts_credentials():
    flags = settings("--api-auth", "alice:a-pw", "--gradio-auth", "g:g-pw").flags()
    assert flags["api_auth"] == "<redacted>" and flags["gradio_auth"] == "<redacted>"
    assert "a-pw" not in str(flags) and "g-pw" not in str(flags)
    assert flags["xformers"] is False and flags["port"] is None


def test_malformed_credentials_exit_without_echoing_them(capsys):
    with pytest.raises(SystemExit):
        settings("--api-auth", "justapassword")
    assert "justapassword" not in capsys.readouterr().err


def test_parse_credentials():
    assert parse_credentials("a:b, c:d:e") == (Credential("a", "b"), Credential("c", "d:e"))
    with pytest.raises(ValueError):
        parse_credentials(":nouser")


def test_read_credentials_file(tmp_path):
    (tmp_path / "f").write_text("x:1\ny:2,z:3\n")
    assert [c.username for c in read_credentials_file(tmp_path / "f")] == ["x", "y", "z"]
