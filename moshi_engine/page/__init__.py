"""The page: the Gradio/FastRTC voice chat page, and what the browser runs.

- `ui`: the Gradio Blocks around FastRTC's WebRTC component, mounted on the app (`mount_ui`);
  the only module that builds Gradio components.
- `rtc`: the FastRTC handler, one browser connection bound to one conversation; `ice`: which
  ICE (STUN / TURN) servers a connection gets.
- `endings`: every sentence a person reads about how a conversation ended or waits;
  `pagescript`: the settings and sentences that Python hands the page's own script.
- `conversation_log`: what happened to each browser connection, and its recording's file;
  `recording`: the stereo WAV of a conversation, aligned as heard.
- `static/` (served by `static_files`): the browser's own files, plain ES modules: the page's
  script (`page.js`: WebRTC, or the websocket when WebRTC cannot connect) and the browser's
  Opus websocket client (`moshi-socket.js`), with its vendored codec.

The page drives sessions of the engine (or of a remote server, through `wire.remote`) and asks
the door who may enter; nothing below it imports the page.
"""
