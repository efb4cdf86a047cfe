// Org switcher: submit as soon as another organization is picked. Without JavaScript the form still has
// its "Switch" button; with it, the button is hidden because picking is enough.
for (const select of document.querySelectorAll("select[data-autosubmit]")) {
  const form = select.form;
  if (!form) continue;
  const fallback = form.querySelector("[data-autosubmit-fallback]");
  if (fallback) fallback.hidden = true;
  select.addEventListener("change", () => form.requestSubmit());
}
