"""Reaching the Prefect API of team mode: one check before a flow or `evit serve` starts.

A Prefect server started with an auth string (infra/team/prefect-server.sh) answers 401 to a
client without `PREFECT_API_AUTH_STRING`; Prefect's own client would fail deep inside the
flow with a traceback. This check fails first, in one line that names the variable (never
its value). Without `PREFECT_API_URL` the flow runs on an ephemeral in-process API and
there is nothing to check.
"""

from __future__ import annotations

import base64
import ssl
import urllib.error
import urllib.request

from evit.errors import UserError


def check_prefect_api(timeout_s: float = 10.0) -> None:
    """Raise UserError when the configured Prefect API refuses this client's auth string or
    its TLS certificate is not trusted (PREFECT_API_SSL_CERT_FILE); other failures are left
    to Prefect's client, which retries them."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_SSL_CERT_FILE, PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return
    secret = PREFECT_API_AUTH_STRING.value()  # the plain string (Prefect unwraps its SecretStr)
    headers = {"Authorization": "Basic " + base64.b64encode(str(secret).encode()).decode()} if secret else {}
    context = (ssl.create_default_context(cafile=PREFECT_API_SSL_CERT_FILE.value() or None)
               if url.startswith("https://") else None)
    req = urllib.request.Request(url.rstrip("/") + "/admin/version", headers=headers)
    try:
        urllib.request.urlopen(req, timeout=timeout_s, context=context).close()
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            hint = ("is not set" if not secret else "was refused")
            raise UserError(f"the Prefect API at {url} requires an auth string: PREFECT_API_AUTH_STRING {hint} "
                            "(USER:PASSWORD, the server's PREFECT_SERVER_API_AUTH_STRING; HTTP 401)") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLCertVerificationError):
            raise UserError(f"the TLS certificate of the Prefect API at {url} is not trusted: set "
                            "PREFECT_API_SSL_CERT_FILE to the CA bundle that signed it (team mode: the services' "
                            "tls/ca.pem)") from None
    except OSError:
        pass
