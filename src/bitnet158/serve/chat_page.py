"""The chat page served at /: plain HTML and JavaScript, no build step. It keeps the conversation in the
page, sends it to /v1/chat/completions with stream=true and appends the streamed text as it arrives."""

CHAT_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>bitnet158 chat</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 48rem; margin: 2rem auto; padding: 0 1rem; }
  #log { border: 1px solid #ccc; border-radius: 6px; padding: 1rem; min-height: 12rem; }
  .message { white-space: pre-wrap; margin: 0.5rem 0; }
  .user { color: #1f4e99; }
  .assistant { font-family: ui-monospace, monospace; }
  .error { color: #b00020; }
  form { display: flex; gap: 0.5rem; margin-top: 1rem; }
  #prompt { flex: 1; }
</style>
</head>
<body data-model="__MODEL__">
<h1>bitnet158 chat</h1>
<div id="log" aria-live="polite"></div>
<form id="form">
  <input id="prompt" autocomplete="off" placeholder="Message" required>
  <button id="send" type="submit">Send</button>
</form>
<p><label>API key (if the server needs one) <input id="key" type="password" autocomplete="off"></label></p>
<script>
const messages = [];
const log = document.getElementById("log");
const form = document.getElementById("form");
const prompt = document.getElementById("prompt");
const send = document.getElementById("send");

function show(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  log.appendChild(div);
  return div;
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = prompt.value;
  prompt.value = "";
  messages.push({role: "user", content: text});
  show("user", text);
  const reply = show("assistant", "");
  send.disabled = true;
  const headers = {"Content-Type": "application/json"};
  const key = document.getElementById("key").value;
  if (key) headers["Authorization"] = "Bearer " + key;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers,
      body: JSON.stringify({model: document.body.dataset.model, messages, stream: true, max_tokens: 128}),
    });
    if (!response.ok) {
      const body = await response.json();
      throw new Error(body.error ? body.error.message : response.statusText);
    }
    // Server-sent events: "data: {json}" lines separated by blank lines, ending with "data: [DONE]".
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += value;
      const events = buffer.split("\\n\\n");
      buffer = events.pop();
      for (const line of events) {
        const data = line.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices.length ? chunk.choices[0].delta.content : null;
        if (delta) reply.textContent += delta;
      }
    }
    messages.push({role: "assistant", content: reply.textContent});
  } catch (error) {
    reply.className = "message error";
    reply.textContent = "Error: " + error.message;
    messages.pop();
  } finally {
    send.disabled = false;
    prompt.focus();
  }
});
</script>
</body>
</html>
"""
