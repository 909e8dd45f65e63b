//! Typed reads of diffusers config dicts, with diffusers' defaults and messages that name
//! the component and the field.

use serde_json::Value;

/// A read-only view of one component's config dict.
pub(crate) struct Fields<'a> {
    component: &'a str,
    value: &'a Value,
}

impl<'a> Fields<'a> {
    pub fn new(component: &'a str, value: &'a Value) -> Self {
        Fields { component, value }
    }

    fn get(&self, name: &str) -> Option<&'a Value> {
        self.value.get(name).filter(|value| !value.is_null())
    }

    fn bad(&self, name: &str, expected: &str) -> String {
        format!("{} config field {name:?} must be {expected}", self.component)
    }

    pub fn usize(&self, name: &str, default: usize) -> Result<usize, String> {
        match self.get(name) {
            None => Ok(default),
            Some(value) => as_usize(value).ok_or_else(|| self.bad(name, "a non-negative integer")),
        }
    }

    /// A field that diffusers accepts as one integer for all blocks or one per block.
    pub fn usize_per_block(
        &self,
        name: &str,
        blocks: usize,
        default: usize,
    ) -> Result<Vec<usize>, String> {
        match self.get(name) {
            None => Ok(vec![default; blocks]),
            Some(Value::Array(items)) => {
                let values = items
                    .iter()
                    .map(as_usize)
                    .collect::<Option<Vec<usize>>>()
                    .ok_or_else(|| self.bad(name, "an integer or a list of integers"))?;
                if values.len() != blocks {
                    return Err(format!(
                        "{} config field {name:?} has {} entries but the model has {blocks} blocks",
                        self.component,
                        values.len()
                    ));
                }
                Ok(values)
            }
            Some(value) => as_usize(value)
                .map(|value| vec![value; blocks])
                .ok_or_else(|| self.bad(name, "an integer or a list of integers")),
        }
    }

    pub fn usize_list(&self, name: &str, default: &[usize]) -> Result<Vec<usize>, String> {
        match self.get(name) {
            None => Ok(default.to_vec()),
            Some(Value::Array(items)) => items
                .iter()
                .map(as_usize)
                .collect::<Option<Vec<usize>>>()
                .ok_or_else(|| self.bad(name, "a list of non-negative integers")),
            Some(_) => Err(self.bad(name, "a list of non-negative integers")),
        }
    }

    pub fn strings(&self, name: &str, default: &[&str]) -> Result<Vec<String>, String> {
        match self.get(name) {
            None => Ok(default.iter().map(|text| text.to_string()).collect()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| item.as_str().map(str::to_string))
                .collect::<Option<Vec<String>>>()
                .ok_or_else(|| self.bad(name, "a list of strings")),
            Some(_) => Err(self.bad(name, "a list of strings")),
        }
    }

    pub fn string(&self, name: &str) -> Result<Option<&'a str>, String> {
        match self.get(name) {
            None => Ok(None),
            Some(value) => value.as_str().map(Some).ok_or_else(|| self.bad(name, "a string")),
        }
    }

    pub fn bool(&self, name: &str, default: bool) -> Result<bool, String> {
        match self.get(name) {
            None => Ok(default),
            Some(value) => value.as_bool().ok_or_else(|| self.bad(name, "true or false")),
        }
    }
}

fn as_usize(value: &Value) -> Option<usize> {
    value.as_u64().and_then(|value| usize::try_from(value).ok())
}
