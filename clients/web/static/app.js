// mdp-web: live output on the job page. No framework, no build step.
// Output is inserted with textContent only, never as HTML: a command printing <script> shows it.
"use strict";

(function () {
  const output = document.getElementById("output");
  if (!output || !window.EventSource) return;
  const final = document.getElementById("final");
  const terminal = new Set(["ok", "failed", "timeout", "error", "invalid", "rejected", "cancelled", "lost"]);
  let chunks = 0;
  let lastN = -1;
  if (final) final.hidden = true; // the stream below shows the same output, interleaved

  function setText(id, value) {
    const el = document.getElementById(id);
    if (el) el.textContent = value === undefined || value === null ? "" : String(value);
  }

  function when(seconds) {
    if (typeof seconds !== "number") return "";
    return new Date(seconds * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  }

  function showJob(job) {
    const badge = document.getElementById("state");
    if (badge && job.state) {
      badge.textContent = job.state;
      badge.className = "badge big state-" + job.state;
    }
    output.dataset.state = job.state || "";
    if (job.worker) {
      const w = job.worker;
      setText("worker", (w.name || w.host || "") + (w.pid ? " (pid " + w.pid + ")" : ""));
    }
    setText("started", when(job.started));
    setText("finished", when(job.finished));
    if (typeof job.finished === "number") {
      const start = typeof job.started === "number" ? job.started : job.created;
      if (typeof start === "number") setText("duration", (job.finished - start).toFixed(2) + " s");
    }
    if (job.exit_code !== undefined) setText("exit-code", job.exit_code);
    if (terminal.has(job.state)) {
      const cancel = document.getElementById("cancel-form");
      if (cancel) cancel.remove();
    }
  }

  function append(chunk) {
    if (chunk.n <= lastN) return; // never show a chunk twice
    lastN = chunk.n;
    chunks += 1;
    const nearBottom = output.scrollHeight - output.scrollTop - output.clientHeight < 40;
    const span = document.createElement("span");
    span.className = chunk.stream === "stderr" ? "stderr" : "stdout";
    if (chunk.binary) {
      span.classList.add("binary");
      span.title = "not UTF-8: shown with replacement characters";
    }
    span.textContent = chunk.text;
    output.appendChild(span);
    if (nearBottom) output.scrollTop = output.scrollHeight;
  }

  const source = new EventSource(output.dataset.events);
  source.addEventListener("state", (e) => showJob(JSON.parse(e.data)));
  source.addEventListener("output", (e) => append(JSON.parse(e.data)));
  source.addEventListener("end", (e) => {
    source.close();
    showJob(JSON.parse(e.data));
    if (final && chunks === 0 && final.textContent.trim()) final.hidden = false;
    output.dataset.done = "true";
  });
  let note = null;
  source.addEventListener("problem", (e) => {
    if (!note) {
      note = document.createElement("p");
      note.className = "alert";
      note.setAttribute("role", "alert");
      output.before(note);
    }
    note.textContent = JSON.parse(e.data).detail;
  });
  source.addEventListener("output", () => {
    if (note) {
      note.remove();
      note = null;
    }
  });
})();
