// MMed-RAG Serve page: sends the form to /vqa or /report and renders the JSON answer.
// Plain browser JavaScript, no dependencies. Server text is always inserted with textContent.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const els = {
    form: $("ask-form"),
    image: $("image"),
    dropzone: $("dropzone"),
    imageError: $("image-error"),
    thumb: $("thumb"),
    thumbImg: $("thumb-img"),
    thumbCaption: $("thumb-caption"),
    questionField: $("question-field"),
    question: $("question"),
    domain: $("domain"),
    retrieval: $("retrieval"),
    kMax: $("k_max"),
    maxTokens: $("max_tokens"),
    temperature: $("temperature"),
    apiKey: $("api-key"),
    submit: $("submit"),
    busy: $("busy"),
    serviceStatus: $("service-status"),
    resultTitle: $("result-title"),
    live: $("live"),
    empty: $("empty"),
    error: $("error"),
    errorTitle: $("error-title"),
    errorMessage: $("error-message"),
    errorMeta: $("error-meta"),
    result: $("result"),
    answerKind: $("answer-kind"),
    answer: $("answer"),
    raw: $("raw"),
    warnings: $("warnings"),
    domainLabel: $("domain-label"),
    domainConfidence: $("domain-confidence"),
    domainSource: $("domain-source"),
    domainProbabilities: $("domain-probabilities"),
    timingTotal: $("timing-total"),
    timings: $("timings"),
    retrievalSummary: $("retrieval-summary"),
    evidence: $("evidence"),
    meta: $("meta"),
    disclaimer: $("disclaimer"),
  };

  const DOMAIN_NAMES = { radiology: "Radiology", ophthalmology: "Ophthalmology", pathology: "Pathology" };
  const STAGES = [
    ["decode", "Decode"],
    ["classify", "Classify"],
    ["retrieve", "Retrieve"],
    ["generate", "Generate"],
  ];
  const ERROR_TITLES = {
    400: "The request was not accepted",
    401: "Authentication required",
    403: "Not allowed",
    404: "Not found",
    413: "The image is too large",
    415: "Unsupported file type",
    422: "The image could not be processed",
    429: "Too many requests",
    500: "Server error",
    503: "A service is unavailable",
    504: "A service did not answer in time",
  };
  const ERROR_HINTS = {
    401: "Enter the API key in the API key field and send again.",
    403: "Check the API key in the API key field.",
    503: "Try again in a moment; `mmedrag status` shows which service is not ready.",
    504: "Try again in a moment, or ask for fewer tokens.",
  };

  let previewUrl = null;
  let previewRequest = 0;

  // ------------------------------------------------------------------ helpers

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function titleCase(word) {
    return word ? word.charAt(0).toUpperCase() + word.slice(1) : "";
  }

  function domainName(label) {
    return DOMAIN_NAMES[label] || titleCase(label);
  }

  function percent(p) {
    const digits = p >= 0.995 && p < 1 ? 2 : p < 0.1 ? 1 : 0; // never round 99.96% up to 100%
    return `${(p * 100).toFixed(digits)}%`;
  }

  function duration(ms) {
    return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms < 10 ? ms.toFixed(1) : Math.round(ms)} ms`;
  }

  function bytes(n) {
    if (n >= 1024 * 1024) return `${(n / (1024 * 1024)).toFixed(1)} MB`;
    if (n >= 1024) return `${Math.round(n / 1024)} kB`;
    return `${n} bytes`;
  }

  function authHeaders() {
    const key = els.apiKey.value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  function bar(name, fraction, value, current) {
    const item = el("li", current ? "current" : "");
    const track = el("span", "track");
    const fill = el("span", "fill");
    fill.style.width = `${Math.max(0, Math.min(1, fraction)) * 100}%`;
    track.append(fill);
    item.append(el("span", "name", name), track, el("span", "value", value));
    return item;
  }

  // The API's error body is {"error": {message, type, param, code}}; anything else gets a plain message.
  async function readError(response) {
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    const info = body && typeof body === "object" ? body.error : null;
    const requestId = response.headers.get("X-Request-ID");
    const status = `${response.status}${response.statusText ? ` ${response.statusText}` : ""}`;
    if (info && typeof info.message === "string") {
      return { status: response.status, statusText: status, message: info.message, code: info.code,
               param: info.param, requestId };
    }
    return { status: response.status, statusText: status, requestId,
             message: `The server answered ${status} without an error description.` };
  }

  // ------------------------------------------------------------------ messages

  function clearError() {
    els.error.hidden = true;
    els.errorTitle.textContent = "";
    els.errorMessage.textContent = "";
    els.errorMeta.textContent = "";
  }

  function showError(problem) {
    els.result.hidden = true;
    els.empty.hidden = true;
    const title = problem.title || ERROR_TITLES[problem.status] ||
      (problem.status >= 500 ? "Server error" : "The request failed");
    els.errorTitle.textContent = problem.statusText ? `${title} (${problem.statusText})` : title;
    const hint = ERROR_HINTS[problem.status];
    els.errorMessage.textContent = hint ? `${problem.message} ${hint}` : problem.message;
    const meta = [];
    if (problem.param) meta.push(`field: ${problem.param}`);
    if (problem.code) meta.push(`code: ${problem.code}`);
    if (problem.requestId) meta.push(`request id: ${problem.requestId}`);
    els.errorMeta.textContent = meta.join(" · ");
    els.errorMeta.hidden = meta.length === 0;
    els.error.hidden = false;
  }

  function showImageError(message) {
    els.imageError.textContent = message;
    els.imageError.hidden = false;
    els.image.setAttribute("aria-invalid", "true");
  }

  function clearImageError() {
    els.imageError.hidden = true;
    els.imageError.textContent = "";
    els.image.removeAttribute("aria-invalid");
  }

  function setBusy(busy) {
    els.submit.disabled = busy;
    els.busy.hidden = !busy;
    els.form.setAttribute("aria-busy", String(busy));
    if (busy) els.live.textContent = "Sending the request…";
  }

  // ------------------------------------------------------------------ service status

  async function checkService() {
    const pill = els.serviceStatus;
    try {
      const response = await fetch("readyz", { headers: { Accept: "application/json" } });
      const body = await response.json().catch(() => ({}));
      if (response.ok) {
        pill.textContent = "Service ready";
        pill.className = "pill ok";
        return;
      }
      const down = Object.entries(body.dependencies || {}).filter(([, ok]) => !ok).map(([name]) => name);
      pill.textContent = down.length ? `Not ready: ${down.join(", ")}` : "Not ready";
      pill.className = "pill bad";
    } catch {
      pill.textContent = "Service unreachable";
      pill.className = "pill bad";
    }
  }

  // ------------------------------------------------------------------ image and preview

  function clearThumb() {
    els.thumb.hidden = true;
    els.thumbImg.removeAttribute("src");
    els.thumbImg.alt = "";
    els.thumbCaption.textContent = "";
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = null;
  }

  // The server decodes the file (DICOM included) and answers a PNG thumbnail the browser can show.
  async function showPreview(file) {
    const request = ++previewRequest;
    clearImageError();
    clearThumb();
    if (!file) return;
    const form = new FormData();
    form.append("image", file, file.name);
    let response;
    try {
      response = await fetch("preview", { method: "POST", body: form, headers: authHeaders() });
    } catch {
      if (request === previewRequest) showImageError("No preview: the server could not be reached.");
      return;
    }
    if (request !== previewRequest) return; // a newer file was chosen meanwhile
    if (!response.ok) {
      const problem = await readError(response);
      if (request === previewRequest) showImageError(problem.message);
      return;
    }
    const blob = await response.blob();
    if (request !== previewRequest) return;
    previewUrl = URL.createObjectURL(blob);
    els.thumbImg.src = previewUrl;
    els.thumbImg.alt = `Preview of ${file.name}`;
    const format = (response.headers.get("X-Image-Format") || "image").toUpperCase();
    const width = response.headers.get("X-Image-Width");
    const height = response.headers.get("X-Image-Height");
    const details = [format];
    if (width && height) details.push(`${width} × ${height} px`);
    details.push(bytes(file.size));
    els.thumbCaption.replaceChildren(el("strong", "", file.name), document.createTextNode(details.join(" · ")));
    const warnings = response.headers.get("X-Image-Warnings");
    if (warnings) els.thumbCaption.append(el("span", "", ` · ${warnings}`));
    els.thumb.hidden = false;
  }

  function chosenFile() {
    return els.image.files && els.image.files.length ? els.image.files[0] : null;
  }

  // ------------------------------------------------------------------ rendering

  function renderAnswer(body, task) {
    els.answerKind.textContent = task === "vqa" ? "Answer" : "Report";
    const verdict = task === "vqa" && (body.answer === "yes" || body.answer === "no");
    els.answer.className = verdict ? "answer verdict" : "answer";
    els.answer.textContent = verdict ? titleCase(body.answer) : body.answer || "(empty answer)";
    const raw = (body.text || "").trim();
    els.raw.hidden = !verdict || !raw;
    els.raw.textContent = raw ? `Model output: “${raw}”` : "";
  }

  function renderDomain(domain) {
    const probabilities = domain.probabilities || {};
    els.domainLabel.textContent = domainName(domain.label);
    const confidence = probabilities[domain.label];
    els.domainConfidence.textContent = typeof confidence === "number" ? `${percent(confidence)} confidence` : "";
    els.domainSource.textContent =
      domain.source === "client" ? "Chosen in the request (classifier skipped)" : "Chosen by the domain classifier";
    const entries = Object.entries(probabilities).sort((a, b) => b[1] - a[1]);
    els.domainProbabilities.replaceChildren(
      ...entries.map(([label, p]) => bar(domainName(label), p, percent(p), label === domain.label)),
    );
    els.domainProbabilities.hidden = entries.length === 0;
  }

  function renderTimings(timings) {
    const total = typeof timings.total === "number" ? timings.total : Object.values(timings).reduce((a, b) => a + b, 0);
    els.timingTotal.textContent = duration(total);
    const known = STAGES.filter(([key]) => key in timings);
    const others = Object.keys(timings)
      .filter((key) => key !== "total" && !STAGES.some(([stage]) => stage === key))
      .map((key) => [key, titleCase(key.replace(/_/g, " "))]);
    els.timings.replaceChildren(
      ...[...known, ...others].map(([key, name]) => bar(name, total > 0 ? timings[key] / total : 0, duration(timings[key]))),
    );
  }

  function retrievalSummary(retrieval, count) {
    if (retrieval.mode === "off") return "Retrieval was off: the answer is based on the image alone.";
    if (count === 0) return "No reports were retrieved for this image.";
    const noun = count === 1 ? "report" : "reports";
    if (retrieval.mode === "adaptive") {
      const gamma = typeof retrieval.gamma === "number" ? `, γ = ${retrieval.gamma}` : "";
      return `Adaptive selection kept ${retrieval.k} of ${count} retrieved ${noun} (k max ${retrieval.k_max}${gamma}). ` +
        "Kept reports went into the prompt.";
    }
    return `Fixed retrieval kept ${retrieval.k} of ${count} retrieved ${noun} (k max ${retrieval.k_max}).`;
  }

  function renderEvidence(evidence, retrieval) {
    const items = [...evidence].sort((a, b) => a.rank - b.rank);
    els.retrievalSummary.textContent = retrievalSummary(retrieval, items.length);
    const top = Math.max(0, ...items.map((item) => item.score));
    els.evidence.replaceChildren(
      ...items.map((item) => {
        const li = el("li", item.kept ? "evidence-item is-kept" : "evidence-item");
        li.dataset.kept = String(Boolean(item.kept));
        const head = el("div", "evidence-head");
        const track = el("span", "score-track");
        track.setAttribute("aria-hidden", "true");
        const fill = el("span", "score-fill");
        fill.style.width = `${top > 0 ? Math.max(0, item.score / top) * 100 : 0}%`;
        track.append(fill);
        head.append(
          el("span", "rank", `#${item.rank}`),
          el("span", "badge " + (item.kept ? "kept" : "dropped"), item.kept ? "Kept · in prompt" : "Not kept"),
          el("span", "score", `score ${Number(item.score).toFixed(3)}`),
          track,
          el("span", "source", [item.source, item.id].filter(Boolean).join(" · ")),
        );
        li.append(head, el("p", "evidence-text", item.text));
        return li;
      }),
    );
  }

  function renderWarnings(warnings) {
    els.warnings.replaceChildren(...(warnings || []).map((text) => el("li", "", titleCase(text))));
    els.warnings.hidden = !warnings || warnings.length === 0;
  }

  function render(body, task) {
    clearError();
    renderAnswer(body, task);
    renderWarnings(body.warnings);
    renderDomain(body.domain);
    renderTimings(body.timings_ms || {});
    renderEvidence(body.evidence || [], body.retrieval);
    els.meta.textContent = `Model ${body.model} · request id ${body.request_id}`;
    els.disclaimer.textContent = body.disclaimer;
    els.empty.hidden = true;
    els.result.hidden = false;
    els.live.textContent = task === "vqa" ? `Answer: ${els.answer.textContent}` : "The report is ready.";
  }

  // ------------------------------------------------------------------ submit

  function selectedTask() {
    return els.form.querySelector('input[name="task"]:checked').value;
  }

  function buildForm(file, task) {
    const form = new FormData();
    form.append("image", file, file.name);
    if (task === "vqa") form.append("question", els.question.value.trim());
    if (els.domain.value) form.append("domain", els.domain.value);
    form.append("retrieval", els.retrieval.value);
    for (const [name, input] of [["k_max", els.kMax], ["max_tokens", els.maxTokens], ["temperature", els.temperature]]) {
      if (input.value.trim() !== "") form.append(name, input.value.trim());
    }
    return form;
  }

  async function submit(event) {
    event.preventDefault();
    clearError();
    els.question.removeAttribute("aria-invalid");
    const file = chosenFile();
    const task = selectedTask();
    if (!file) {
      showError({ title: "No image chosen", message: "Choose a PNG, JPEG or DICOM image first." });
      els.image.focus();
      return;
    }
    if (task === "vqa" && !els.question.value.trim()) {
      showError({ title: "No question", message: "Type a yes/no question, or choose the Report task." });
      els.question.setAttribute("aria-invalid", "true");
      els.question.focus();
      return;
    }
    setBusy(true);
    let response;
    try {
      response = await fetch(task, {
        method: "POST",
        body: buildForm(file, task),
        headers: { Accept: "application/json", ...authHeaders() },
      });
      if (!response.ok) {
        showError(await readError(response));
      } else {
        render(await response.json(), task);
      }
    } catch {
      showError({ title: "The server could not be reached",
                  message: "Check that the router is running and reachable, then send again." });
    } finally {
      setBusy(false);
    }
    if (!els.error.hidden) els.live.textContent = `${els.errorTitle.textContent}: ${els.errorMessage.textContent}`;
    els.resultTitle.focus();
    if (response && (response.status === 503 || response.status === 504)) checkService();
  }

  // ------------------------------------------------------------------ wiring

  function updateTask() {
    const vqa = selectedTask() === "vqa";
    els.questionField.hidden = !vqa;
    els.question.disabled = !vqa;
  }

  els.form.addEventListener("submit", submit);
  els.image.addEventListener("change", () => showPreview(chosenFile()));
  for (const radio of els.form.querySelectorAll('input[name="task"]')) radio.addEventListener("change", updateTask);

  // Drop onto the drop zone; a file dropped elsewhere must not navigate away from the page.
  for (const type of ["dragover", "drop"]) window.addEventListener(type, (event) => event.preventDefault());
  for (const type of ["dragenter", "dragover"]) {
    els.dropzone.addEventListener(type, (event) => {
      event.preventDefault();
      els.dropzone.classList.add("dragging");
    });
  }
  els.dropzone.addEventListener("dragleave", () => els.dropzone.classList.remove("dragging"));
  els.dropzone.addEventListener("drop", (event) => {
    event.preventDefault();
    els.dropzone.classList.remove("dragging");
    const files = event.dataTransfer && event.dataTransfer.files;
    if (!files || files.length === 0) return;
    const transfer = new DataTransfer();
    transfer.items.add(files[0]);
    els.image.files = transfer.files;
    showPreview(files[0]);
  });

  updateTask();
  checkService();
})();
