// The schedule form's helpers: the time zone as a searchable select (Django's own select2),
// and under the cron field the expression in words with its next 5 runs in the schedule's
// zone, asked of the server (cronsim, as the scheduler itself computes them) as you type.
window.addEventListener("load", function () {
  "use strict";
  const $ = window.django && window.django.jQuery;
  const zone = document.getElementById("id_timezone");
  if ($ && zone && zone.tagName === "SELECT") $(zone).select2({ width: "20em" });
  const cron = document.getElementById("id_cron");
  const source = document.getElementById("cron-preview-url");
  if (!cron || !source) return;
  const url = JSON.parse(source.textContent);
  const box = document.createElement("div");
  box.id = "cron-preview";
  box.className = "help";
  box.setAttribute("aria-live", "polite");
  cron.insertAdjacentElement("afterend", box);
  let timer = null;
  let asked = 0;

  function show(answer) {
    box.replaceChildren();
    if (!answer.ok) {
      box.dataset.state = "error";
      box.textContent = answer.error;
      return;
    }
    box.dataset.state = "ok";
    const words = document.createElement("strong");
    words.textContent = answer.description;
    const list = document.createElement("ol");
    for (const run of answer.next) {
      const item = document.createElement("li");
      item.textContent = run.replace("T", " ");
      list.appendChild(item);
    }
    box.append(words, " — next runs (" + answer.timezone + "):", list);
  }

  async function ask() {
    const expression = cron.value.trim();
    if (!expression) { box.replaceChildren(); box.dataset.state = "empty"; return; }
    const query = new URLSearchParams({ cron: expression, timezone: zone ? zone.value : "UTC" });
    const mine = ++asked;
    const response = await fetch(url + "?" + query, { credentials: "same-origin" });
    if (response.ok && mine === asked) show(await response.json());  // the latest answer only
  }

  function soon() { window.clearTimeout(timer); timer = window.setTimeout(ask, 250); }
  cron.addEventListener("input", soon);
  if (zone) { zone.addEventListener("change", soon); if ($) $(zone).on("change", soon); }
  ask();
});
