"""Answers Ollama's HTTP router (gin, over Go's net/http) gives outside its handlers."""

from __future__ import annotations

import html

__all__ = ["slash_redirect"]


def slash_redirect(method: str, location: str) -> tuple[int, list[tuple[str, str]], bytes]:
    """gin's trailing-slash redirect to ``location`` (the path without its slash, and the query):
    301 for a GET, else 307, which keeps the method and body; `http.Redirect` gives a GET or HEAD
    an HTML content type and a GET its small HTML body. Returns (status, headers, body)."""
    status = 301 if method == "GET" else 307
    headers = [("Location", location)]
    if method not in ("GET", "HEAD"):
        return status, headers, b""
    body = f'<a href="{html.escape(location)}">Moved Permanently</a>.\n\n' if method == "GET" else ""
    return status, [*headers, ("Content-Type", "text/html; charset=utf-8")], body.encode()
