// The dashboard's only script (the Content-Security-Policy allows this file and nothing inline): copy buttons.
document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-copy]");
  if (!button) return;
  const field = document.getElementById(button.dataset.copy);
  field.select();
  const done = () => { button.textContent = "Copied"; };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(field.value).then(done, () => { document.execCommand("copy"); done(); });
  } else {
    document.execCommand("copy");
    done();
  }
});

// The requests page's live mode: new requests pushed by the gateway (server-sent events), newest on top.
const LIVE_ROWS = 200;
const liveButton = document.getElementById("live");
if (liveButton) {
  const state = document.getElementById("live-state");
  const body = document.getElementById("rows");
  let source = null;
  const rowsOf = (html) => {
    const holder = document.createElement("template");
    holder.innerHTML = html; // rendered and escaped by the gateway's templates
    return Array.from(holder.content.querySelectorAll("tr"));
  };
  const stop = (message) => {
    if (source) source.close();
    source = null;
    liveButton.textContent = "Live";
    liveButton.setAttribute("aria-pressed", "false");
    state.textContent = message;
  };
  const place = (row) => {
    const created = Number(row.dataset.created);
    const next = Array.from(body.querySelectorAll("tr[data-created]")).find((r) => Number(r.dataset.created) <= created);
    row.classList.add("fresh");
    body.insertBefore(row, next || null);
  };
  const start = () => {
    source = new EventSource(liveButton.dataset.live);
    liveButton.textContent = "Pause";
    liveButton.setAttribute("aria-pressed", "true");
    state.textContent = "Connecting…";
    source.onopen = () => { state.textContent = "Live: new requests appear as they are recorded."; };
    source.onerror = () => { if (source) state.textContent = "Reconnecting…"; };
    source.addEventListener("rows", (event) => {
      const data = JSON.parse(event.data);
      const rows = rowsOf(data.html);
      if (data.reset) {
        body.replaceChildren(...rows);
      } else {
        body.querySelectorAll("tr.none").forEach((r) => r.remove());
        rows.forEach(place);
      }
      const all = body.querySelectorAll("tr[data-created]");
      for (let i = LIVE_ROWS; i < all.length; i++) all[i].remove();
    });
    source.addEventListener("end", (event) => stop(JSON.parse(event.data).reason));
  };
  liveButton.addEventListener("click", () => (source ? stop("Paused.") : start()));
}
