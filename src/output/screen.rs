//! `status --watch`: a view redrawn in place on the terminal's alternate screen,
//! until `q`, Ctrl-C or another signal. Each frame overwrites the last one line by
//! line (cursor home, each line cleared to its end, the rest of the screen cleared),
//! so nothing flickers.

use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::termios::{self, LocalFlags, SetArg, Termios};

use crate::error::{Error, Result};
use crate::wait::WaitSignals;

const ENTER: &str = "\x1b[?1049h\x1b[?25l";
const LEAVE: &str = "\x1b[?25h\x1b[?1049l";
const HOME: &str = "\x1b[H";
const CLEAR_LINE_END: &str = "\x1b[K";
const CLEAR_BELOW: &str = "\x1b[J";

/// Draws `frame()` every `interval` until the user quits. Needs a terminal.
pub fn watch(interval: Duration, mut frame: impl FnMut() -> String) -> Result<()> {
    if !std::io::stdout().is_terminal() {
        return Err(Error::Usage(
            "--watch redraws a terminal: stdout is not one (leave --watch out to print once)"
                .into(),
        ));
    }
    let signals = WaitSignals::install()?;
    let quit = Arc::new(AtomicBool::new(false));
    let _keys = KeyInput::start(Arc::clone(&quit), signals.doorbell().clone());
    let _screen = AlternateScreen::enter()?;
    loop {
        draw(&frame())?;
        signals.doorbell().sleep(interval);
        if quit.load(Ordering::Relaxed) || signals.pending().is_some() {
            return Ok(());
        }
    }
}

/// One frame: every line cleared to its end, and whatever the last frame left below.
fn draw(text: &str) -> Result<()> {
    let mut out = anstream::stdout().lock();
    let mut frame = String::from(HOME);
    for line in text.lines() {
        frame.push_str(line);
        frame.push_str(CLEAR_LINE_END);
        frame.push_str("\r\n");
    }
    frame.push_str(CLEAR_BELOW);
    out.write_all(frame.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|err| Error::Runtime(format!("cannot write to the terminal: {err}")))
}

/// The alternate screen, with the cursor hidden, for as long as it lives.
struct AlternateScreen;

impl AlternateScreen {
    fn enter() -> Result<Self> {
        let mut out = std::io::stdout().lock();
        out.write_all(ENTER.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|err| Error::Runtime(format!("cannot write to the terminal: {err}")))?;
        Ok(AlternateScreen)
    }
}

impl Drop for AlternateScreen {
    fn drop(&mut self) {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(LEAVE.as_bytes());
        let _ = out.flush();
    }
}

/// Keys one at a time, without echo, from a terminal on stdin: `q` quits. Ctrl-C
/// still raises SIGINT. The terminal's settings come back when this is dropped.
struct KeyInput {
    saved: Option<Termios>,
}

impl KeyInput {
    fn start(quit: Arc<AtomicBool>, bell: crate::wait::Doorbell) -> Self {
        let stdin = std::io::stdin();
        let saved = stdin
            .is_terminal()
            .then(|| termios::tcgetattr(stdin.as_fd()).ok())
            .flatten();
        if let Some(saved) = &saved {
            let mut keys = saved.clone();
            keys.local_flags
                .remove(LocalFlags::ICANON | LocalFlags::ECHO);
            let _ = termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &keys);
        }
        let _ = std::thread::Builder::new()
            .name("keys".into())
            .spawn(move || {
                let mut byte = [0u8; 1];
                while let Ok(1) = std::io::stdin().read(&mut byte) {
                    if matches!(byte[0], b'q' | b'Q') {
                        quit.store(true, Ordering::Relaxed);
                        bell.ring();
                        return;
                    }
                }
            });
        KeyInput { saved }
    }
}

impl Drop for KeyInput {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, saved);
        }
    }
}
