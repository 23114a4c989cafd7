//! How Ferry reports an error to people: the whole chain of causes, once.
//!
//! The transport layers say little at the top (`transport error`) and keep
//! the cause that matters (`Connection refused`) a few `source()`s down,
//! while many errors repeat their source in their own message. [`Chain`]
//! prints the message and then every cause, skipping a cause whose text is
//! already in what it printed, so nothing is lost and nothing is said twice.

use std::error::Error;
use std::fmt;

/// Displays an error with all its causes, joined by `": "`, on one line.
///
/// ```
/// let e = std::io::Error::other("disk on fire");
/// assert_eq!(ferry_core::Chain(&e).to_string(), "disk on fire");
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut said = self.0.to_string();
        let mut cause = self.0.source();
        while let Some(e) = cause {
            let text = e.to_string();
            if !text.is_empty() && !said.contains(&text) {
                said.push_str(": ");
                said.push_str(&text);
            }
            cause = e.source();
        }
        // One line, whatever a cause's text holds.
        f.write_str(&said.replace('\n', " "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One link of a test chain.
    #[derive(Debug)]
    struct Link {
        message: String,
        source: Option<Box<dyn Error + 'static>>,
    }

    impl fmt::Display for Link {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.message)
        }
    }

    impl Error for Link {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.source.as_deref()
        }
    }

    /// A chain from the outermost message inwards, ending in `leaf`.
    fn chain(messages: &[&str], leaf: Option<Box<dyn Error + 'static>>) -> Box<dyn Error> {
        let mut source = leaf;
        for m in messages.iter().rev() {
            source = Some(Box::new(Link {
                message: (*m).to_owned(),
                source,
            }));
        }
        source.expect("at least one message")
    }

    #[test]
    fn the_cause_of_a_refused_connection_is_kept() {
        // The shape of a tonic connect error to a closed port.
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let refused_text = refused.to_string();
        let e = chain(
            &[
                "cannot connect to controller https://127.0.0.1:1: transport error",
                "transport error",
                "tcp connect error",
                "tcp connect error",
            ],
            Some(Box::new(refused)),
        );
        assert_eq!(
            Chain(e.as_ref()).to_string(),
            format!(
                "cannot connect to controller https://127.0.0.1:1: transport error: tcp connect error: {refused_text}"
            )
        );
    }

    #[test]
    fn a_cause_the_message_already_says_is_not_repeated() {
        // A refused pin: the verifier's text comes up twice from below.
        let pin = "the controller's certificate chain does not contain the pinned ca sha256:00";
        let e = chain(
            &[
                "cannot connect to controller https://h:1: transport error",
                "transport error",
                &format!("unexpected error: {pin}"),
                &format!("unexpected error: {pin}"),
                pin,
            ],
            None,
        );
        let text = Chain(e.as_ref()).to_string();
        assert_eq!(
            text,
            format!(
                "cannot connect to controller https://h:1: transport error: unexpected error: {pin}"
            )
        );
        assert_eq!(text.matches(pin).count(), 1, "{text}");
    }

    #[test]
    fn causes_deeper_than_a_repeated_one_are_still_shown() {
        let e = chain(&["read failed: i/o", "i/o", "", "disk gone"], None);
        assert_eq!(Chain(e.as_ref()).to_string(), "read failed: i/o: disk gone");
    }

    #[test]
    fn an_error_without_causes_is_its_message() {
        let e = chain(&["session closed"], None);
        assert_eq!(Chain(e.as_ref()).to_string(), "session closed");
    }
}
