-- The read script (after the prelude). KEYS[1] key: the record, when it
-- expires, and the store's clock (a claim on a full Redis decides from it
-- whether a lease is live).
local raw, rec = load(KEYS[1])
if rec == false then return {'corrupt', raw} end
if not rec then return {'absent'} end
return {'found', raw, expiry(KEYS[1]), now_ms()}
