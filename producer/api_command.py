"""``salient api``: serve the HTTP API (producer/api.py) with uvicorn."""

from __future__ import annotations

import ipaddress

import click

from salient_maps.storage.settings import Settings

from .job_commands import data_dir_option


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--insecure-no-auth", is_flag=True,
              help="Serve without tokens, so anyone who can connect may submit and cancel jobs: loopback hosts only.")
@data_dir_option
def api(host, port, insecure_no_auth, data_dir):
    """Serve the HTTP API: POST /jobs, GET /jobs/{id}[/results|/errors], DELETE /jobs/{id}; schema at /docs.

    Clients send `Authorization: Bearer TOKEN`, TOKEN one of SALIENT_API_TOKENS (comma-separated).
    """
    try:
        import uvicorn

        from .api import api_tokens, create_app
    except ImportError as exc:
        raise click.ClickException(f"'salient api' needs the api extra ({exc.name or exc} is not installed): "
                                   "pip install 'salient-maps[api]'") from None
    settings = Settings().with_data_dir(data_dir)
    tokens = api_tokens(settings)
    if not tokens and not insecure_no_auth:
        raise click.ClickException("no API tokens: set SALIENT_API_TOKENS=TOKEN[,TOKEN...] "
                                   "(or --insecure-no-auth on a loopback host, for trying it out)")
    if not tokens and not is_loopback(host):
        raise click.ClickException(f"--insecure-no-auth serves only on a loopback host, not {host}: "
                                   "set SALIENT_API_TOKENS to listen there")
    if tokens and insecure_no_auth:
        click.echo("SALIENT_API_TOKENS is set: --insecure-no-auth ignored, tokens required", err=True)
    uvicorn.run(create_app(settings, insecure_no_auth=not tokens), host=host, port=port, log_level="info")
