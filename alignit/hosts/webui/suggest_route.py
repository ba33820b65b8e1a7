"""``POST /alignit/suggest`` on the WebUI's FastAPI app (registered by ``on_app_started``, with or without the UI).

Request: ``{"trigger", "class_word"?, "source"?, "strength"?, "placeholder"?, "top"?}`` (a concept row as the
accordion has it; ``top`` defaults to 5). Response: the ranked ``[{"word", "score"}]``, best first; 422 for a request
that cannot be read, 400 for a concept the loaded model cannot use, each as ``{"detail": "one line"}``.
"""

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .flow import Host
from .suggestions import ROUTE, respond


def register(app: FastAPI, host: Host) -> None:
    """Add the route; the work runs in a worker thread (it waits for the WebUI's queue lock)."""

    async def suggest_class_words(request: Request) -> JSONResponse:
        status, content = await run_in_threadpool(respond, host, await request.body())
        return JSONResponse(content, status_code=status)

    app.add_api_route(ROUTE, suggest_class_words, methods=["POST"], summary="AlignIT: rank class words for a concept row")
