"""`arrl dashboard`: a local, offline web page that follows a campaign live.

`data` builds the page's JSON (from a run directory, or from the campaign's Redis while it runs),
`server` serves it and the static page (`static/`: hand-written HTML, JS and CSS, no external
assets) with the standard library's HTTP server.
"""

from arrl.dashboard.server import Dashboard, serve

__all__ = ["Dashboard", "serve"]
