"""Talk to a Moshi server from the command line: stream a WAV, print the transcript, save the answer.

    python -m moshi_engine.client ws://127.0.0.1:7860/api/chat --wav assets/speech/hello.wav --out reply.wav
    python -m moshi_engine.client ws://127.0.0.1:7860/api/chat --voice moshika --wav ...   # = ...?voice=moshika

Speaks both protocols (the URL's path picks one; a bare http://host:port means /api/chat),
against this app's server or moshi's reference server, and waits in line when every slot is
taken. The client itself is `wire.remote` (`RemoteSession`, `exchange`). Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from urllib.parse import urlencode

from .audio import read_wav, write_wav
from .conversation import BusyError, Sampling, SessionClosed, SessionError
from .door.line import LinePosition
from .wire.remote import exchange, websocket_url, with_query


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moshi_engine.client",
        description="Stream a WAV to a Moshi server (ours or moshi's) and save what Moshi says back.",
    )
    parser.add_argument("url", help="ws://host:port/api/chat, ws://host:port/ws, or http://host:port "
                        "(a private server's token rides on it: ...?token=SECRET)")
    parser.add_argument("--wav", required=True, help="what to say: a 16-bit WAV (resampled to 24 kHz)")
    parser.add_argument("--out", help="write Moshi's answer to this WAV")
    parser.add_argument("--fast", action="store_true", help="send as fast as the server takes it, not in real time")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--temp", type=float)
    parser.add_argument("--temp-text", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-k-text", type=int)
    parser.add_argument("--voice", help="one of the server's voices (its /status lists them): the same as ?voice=NAME")
    args = parser.parse_args(argv)
    url = with_query(websocket_url(args.url), "?" + urlencode({"voice": args.voice})) if args.voice else args.url
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    overrides = {"seed": args.seed, "temp": args.temp, "temp_text": args.temp_text, "top_k": args.top_k,
                 "top_k_text": args.top_k_text}
    sampling = Sampling().updated(**overrides) if any(v is not None for v in overrides.values()) else None
    def in_line(position: LinePosition) -> None:
        print(f"every slot is taken: number {position.position} of {position.waiting} in line, "
              f"about {position.eta_s / 60:.0f} min", file=sys.stderr)

    try:
        # Sent as fast as the server takes them, the frames are all queued long before the last
        # answer comes: wait longer for it then.
        result = asyncio.run(exchange(url, read_wav(args.wav), sampling, realtime=not args.fast,
                                      tail_s=5.0 if args.fast else 1.0, on_position=in_line))
    except (OSError, BusyError, SessionClosed, SessionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(result.text.strip())
    first = result.time_to_first_audio
    seconds = result.pcm.size / 24000
    conversation = f"conversation {result.conversation_id}: " if result.conversation_id else ""
    print(f"[{conversation}{seconds:.2f} s of audio back; first audio after "
          f"{'-' if first is None else f'{first * 1000:.0f} ms'}; closed {result.close_code}]", file=sys.stderr)
    if args.out:
        write_wav(args.out, result.pcm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
