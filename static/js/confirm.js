// Destructive actions ask first: <form data-confirm="Remove …?"> is only submitted after the user agrees.
// CSP forbids inline onsubmit handlers, hence this module.
document.addEventListener("submit", (event) => {
  const form = event.target;
  if (!(form instanceof HTMLFormElement)) return;
  const question = form.dataset.confirm;
  if (question && !window.confirm(question)) event.preventDefault();
});
