"""The web dashboard (`/dashboard`, `dashboard.enabled`): pages written on the server from templates
(`templates/`), one stylesheet, SVG charts (`charts`), one small script (a copy button) and nothing inline.
Pages: the overview (`views`), the requests (`requests`), the keys (`keys`) and the credits (`credits`).

Who signs in: a team, with one of its management keys (it sees its own team only, as the management API
would show it), or the operator, with a token only the CLI (`stats-gateway admin-token create`) or the
environment (`GATEWAY_ADMIN_TOKEN`) makes (every team). A session is an opaque random token in a cookie
(`HttpOnly`, `SameSite=Strict`, `Secure` behind TLS, path `/dashboard`), kept in the store by its hash only,
with its own CSRF token for every form; it expires, and signing out deletes it. A team's session ends with
the key it signed in with (disabled or revoked). See docs/dashboard.md.
"""

from __future__ import annotations

from proxy.dashboard.views import add_routes

__all__ = ["add_routes"]
