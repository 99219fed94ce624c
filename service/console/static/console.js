// postcall console: choosing a turn's time plays the audio from there. The only script; no inline handlers,
// so the Content-Security-Policy can forbid inline script entirely.
"use strict";
document.addEventListener("click", function (event) {
  var button = event.target.closest("button[data-seek]");
  var player = document.getElementById("player");
  if (!button || !player) return;
  var seconds = Number(button.getAttribute("data-seek"));
  if (!isFinite(seconds) || seconds < 0) return;
  player.currentTime = seconds;
  var playing = player.play();
  if (playing && playing.catch) playing.catch(function () {});  // no audio device: the seek still happened
  player.focus();
});
